"""Damaged checkpoints are detected, named and never loaded silently.

- Array fingerprints (`convert.integrity`) do not depend on sharding and change with any
  changed element.
- A `convert hf-to-orbax` export with 64 bytes overwritten in its largest data file: `load_orbax`
  raises and `convert orbax-to-hf` exits 1 naming the array and the directory, writing nothing.
- Training: the newest checkpoint step damaged -> the run says which step it skipped and why,
  moves it to `damaged_checkpoints/`, resumes from the previous intact step and ends
  bitwise equal to an uninterrupted run; every step damaged -> an error listing each step.
- `train.keep_checkpoints=0` is refused (a SIGTERM checkpoint would not survive).
"""
import os
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import llava15_tiny_stage1
from mllm_jax import cli
from mllm_jax.convert import integrity
from mllm_jax.convert.orbax_io import load_orbax
from mllm_jax.train import loop
from mllm_jax.train.checkpoints import CheckpointDamagedError
import hf_factories


def damage_largest_file(directory, nbytes=64):
    """Overwrites `nbytes` in the middle of the largest file under `directory` (orbax's
    ocdbt data files); returns its path."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(nbytes)
        f.seek(size // 2)
        f.write(bytes((b ^ 0x5A) for b in old))
    return path


# ---- fingerprints --------------------------------------------------------------------------

def test_fingerprint_ignores_sharding_and_sees_one_changed_element():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 12), jnp.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("a", "b")))
    tree = {"x": x, "bf16": x.astype(jnp.bfloat16), "i": jnp.arange(5, dtype=jnp.int32),
            "key": jax.random.key(3), "raw_key": jax.random.PRNGKey(3)}
    one = integrity.fingerprints(tree)
    assert integrity.fingerprints({**tree, "x": sharded}) == one
    assert one["key"]["dtype"].startswith("key<")
    changed = x.at[5, 7].set(np.nextafter(x[5, 7], np.float32(np.inf)))
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    minus_zero = jnp.zeros(3).at[1].set(-0.0)
    assert integrity.fingerprints({"x": changed})["x"] != one["x"]
    assert integrity.fingerprints({"x": swapped})["x"] != one["x"]
    assert integrity.fingerprints({"z": minus_zero}) != integrity.fingerprints(
        {"z": jnp.zeros(3)})
    rec = integrity.record(tree)
    assert integrity.mismatches(tree, rec) == []
    bad = integrity.mismatches({**tree, "x": changed}, rec)
    assert [p for p, _ in bad] == ["x"]


def test_host_and_device_fingerprints_agree(monkeypatch):
    """Small addressable arrays are reduced with NumPy, the rest on device: the same value
    for every element type, 64-bit ones included."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 7), jnp.float32)
    tree = {"f32": x, "bf16": x.astype(jnp.bfloat16), "f16": x.astype(jnp.float16),
            "i8": (x * 50).astype(jnp.int8), "u8": (x * 50).astype(jnp.uint8),
            "bool": x > 0, "i32": (x * 1e6).astype(jnp.int32), "u32": jnp.arange(
                70000, dtype=jnp.uint32) * 77777, "key": jax.random.key(3),
            "raw_key": jax.random.PRNGKey(3), "scalar": jnp.float32(-0.0),
            "nan": jnp.array([np.nan, -np.nan, np.inf], jnp.float32), "empty": jnp.zeros((0, 4))}
    host = integrity.fingerprints(tree)
    monkeypatch.setattr(integrity, "HOST_BYTES", -1)
    assert integrity.fingerprints(tree) == host
    with jax.enable_x64(True):
        wide = {"f64": x.astype(jnp.float64) / 3, "i64": jnp.arange(40, dtype=jnp.int64) << 33}
        device = integrity.fingerprints(wide)
        monkeypatch.setattr(integrity, "HOST_BYTES", 1 << 24)
        assert integrity.fingerprints(wide) == device


# ---- convert exports -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    hf_factories.make_llama(str(root / "hf"))
    assert cli.main(["convert", "hf-to-orbax", str(root / "hf"), str(root / "orbax")]) == 0
    assert os.path.exists(root / "orbax" / integrity.RECORD_FILE)
    return root


def test_intact_export_loads(export):
    load_orbax(export / "orbax")


def test_damaged_export_is_refused_by_load_and_convert(export, tmp_path, capsys):
    import shutil
    src = tmp_path / "orbax"
    shutil.copytree(export / "orbax", src)
    damage_largest_file(src / "params")
    with pytest.raises(integrity.IntegrityError) as e:
        load_orbax(src)
    msg = str(e.value)
    assert str(src / "params") in msg and "differ from what was written" in msg
    assert "write it again" in msg
    bad_array = msg.split("): ", 1)[1].split(" ", 1)[0]
    assert "/" in bad_array  # a parameter path, e.g. model/embed_tokens/embedding

    dst = tmp_path / "hf_out"
    capsys.readouterr()
    assert cli.main(["convert", "orbax-to-hf", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(src / "params") in err and bad_array in err
    assert not dst.exists() or not os.listdir(dst)


def test_export_written_before_records_still_loads(export, tmp_path):
    import shutil
    src = tmp_path / "old"
    shutil.copytree(export / "orbax", src)
    os.remove(src / integrity.RECORD_FILE)
    load_orbax(src)


# ---- training checkpoints ------------------------------------------------------------------

STEPS = 6


def _config(num_steps=STEPS, **train):
    c = llava15_tiny_stage1.get_config()
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.train.update(global_batch_size=4, num_steps=num_steps, checkpoint_every=2,
                   log_every=1000, async_checkpointing=False, export_final=False)
    c.train.update(**train)
    c.data.text_len = 8
    return c


def _train(cfg, workdir, stop_after=None, log=None):
    lines = []

    def on_step(step, _):
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer checkpoints and stops

    out = loop.train(cfg, str(workdir), log=lines.append if log is None else log,
                     on_step=on_step, devices=jax.devices()[:1])
    out["log"] = lines
    return out


def _flat(tree):
    return {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _flat(_train(_config(), tmp_path_factory.mktemp("ref") / "run")["final_params"])


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run of STEPS stopped by SIGTERM after step 4: checkpoints 2 and 4."""
    workdir = tmp_path_factory.mktemp("stopped") / "run"
    first = _train(_config(), workdir, stop_after=4)
    assert first["stopped_at"] == 4
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


def _copy(workdir, tmp_path):
    import shutil
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


def test_damaged_newest_step_falls_back_and_resumes_bitwise(tmp_path, stopped, reference):
    workdir = _copy(stopped, tmp_path)
    damage_largest_file(workdir / "checkpoints" / "4" / "state")

    resumed = _train(_config(), workdir)
    skipped = [line for line in resumed["log"] if "checkpoint step 4 is damaged" in line]
    assert skipped, resumed["log"]
    assert str(workdir / "damaged_checkpoints" / "4") in skipped[0]
    assert "differ from the checksums" in skipped[0] and "/kernel" in skipped[0]
    assert resumed["start_step"] == 2
    assert os.path.isdir(workdir / "damaged_checkpoints" / "4" / "state")  # nothing lost
    got = _flat(resumed["final_params"])
    assert sorted(got) == sorted(reference)
    differ = [k for k in reference if not np.array_equal(got[k], reference[k])]
    assert not differ, differ


def test_unreadable_json_item_is_damage_too(tmp_path, stopped):
    workdir = _copy(stopped, tmp_path)
    with open(workdir / "checkpoints" / "4" / "data" / "metadata", "w") as f:
        f.write("{not json")
    out = _train(_config(num_steps=2), workdir)  # restore only: no step to run
    assert out["start_step"] == 2
    assert any("checkpoint step 4 is damaged" in line and "data/ item is unreadable" in line
               for line in out["log"]), out["log"]


def test_every_step_damaged_is_an_error_listing_each(tmp_path, stopped):
    workdir = _copy(stopped, tmp_path)
    for step in ("2", "4"):
        damage_largest_file(workdir / "checkpoints" / step / "state")
    with pytest.raises(CheckpointDamagedError) as e:
        _train(_config(), workdir)
    msg = str(e.value)
    assert "step 4:" in msg and "step 2:" in msg and "damaged_checkpoints" in msg
    assert "start a new run in a new workdir" in msg
    assert sorted(os.listdir(workdir / "damaged_checkpoints")) == ["2", "4"]


def test_keep_checkpoints_zero_is_refused(tmp_path):
    """Through the API too: a run keeping no checkpoint could not resume (nor keep the one
    a stop signal writes), so train() refuses it before creating the workdir."""
    with pytest.raises(ValueError, match=r"train.keep_checkpoints = 0: must be an integer "
                                         r">= 1.*including the one a preempted run needs"):
        _train(_config(keep_checkpoints=0), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- the checkpoint manager alone (no model) -----------------------------------------------

def _small_state(seed):
    k = jax.random.PRNGKey(seed)
    return {"params": {"w": jax.random.normal(k, (64, 64)), "b": jnp.zeros(64)},
            "step": jnp.int32(seed)}


def test_arrays_orbax_cannot_read_are_damage(tmp_path):
    from mllm_jax.train import recipe
    from mllm_jax.train.checkpoints import Checkpoints
    cfg = recipe.base("tiny-llava")
    cfg.train.update(async_checkpointing=False, checkpoint_every=1)
    lines = []
    ckpts = Checkpoints(str(tmp_path), cfg.train, log=lines.append)
    for step in (1, 2):
        ckpts.save(step, _small_state(step), {"pos": step}, cfg)
    ckpts.wait_until_finished()
    # Truncate every data file of step 2: tensorstore fails reading the arrays.
    for r, _, fs in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for f in fs:
            if os.sep + "d" in r[len(str(tmp_path)):]:
                with open(os.path.join(r, f), "r+b") as fh:
                    fh.truncate(10)
    abstract = jax.eval_shape(lambda: _small_state(0))
    out = Checkpoints(str(tmp_path), cfg.train, log=lines.append).restore(abstract, cfg)
    assert out["step"] == 1 and out["data"] == {"pos": 1}
    assert int(out["state"]["step"]) == 1
    assert any("checkpoint step 2 is damaged" in line and "orbax could not read" in line
               for line in lines), lines
    assert os.path.isdir(tmp_path / "damaged_checkpoints" / "2")


def test_checkpoint_written_before_records_restores_unchecked(tmp_path):
    import orbax.checkpoint as ocp
    from mllm_jax.train import recipe
    from mllm_jax.train.checkpoints import Checkpoints
    cfg = recipe.base("tiny-llava")
    with ocp.CheckpointManager(str(tmp_path / "checkpoints")) as mngr:  # the old layout
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(_small_state(3)),
                                             data=ocp.args.JsonSave({"pos": 3})))
    lines = []
    abstract = jax.eval_shape(lambda: _small_state(0))
    out = Checkpoints(str(tmp_path), cfg.train, log=lines.append).restore(abstract, cfg)
    assert out["step"] == 3 and int(out["state"]["step"]) == 3
    assert any("without its config and checksums" in line for line in lines), lines
