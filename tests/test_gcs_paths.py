"""gs:// paths for data, the workdir, checkpoints and exports, with no network: etils'
`mock_epath` sends every gs://bucket/... path to a local folder standing in for the bucket.

Anything that reached a gs:// path through os-level calls instead of epath would land in a
`gs:` folder of the working directory, which each test checks stays absent. orbax writes
arrays through tensorstore, which the mock cannot redirect: the tests check that our code
hands orbax the gs:// path unchanged, and do not run orbax against it (a whole `train` run
with a gs:// workdir is therefore tested as its pieces).
"""
import json
import os

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing

from mllm_jax import storage

BUCKET = "gs://bucket"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The local folder holding gs://bucket while the test runs."""
    root = tmp_path / "gcs"
    (root / "bucket").mkdir(parents=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(path):
        path = os.fspath(path)
        return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

    def remote(path):
        path = os.fspath(path)
        return "gs://" + os.path.relpath(path, root) if path.startswith(str(root)) else path

    def one(orig, path, *args, **kwargs):
        return orig(local(path), *args, **kwargs)

    def two(orig, src, dst, *args, **kwargs):
        return orig(local(src), local(dst), *args, **kwargs)

    def glob(orig, pattern):
        return [remote(p) for p in orig(local(pattern))]

    def walk(orig, top, **kwargs):
        for base, dirs, files in orig(local(top), **kwargs):
            yield remote(base), dirs, files

    with epath_testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk):
        yield root / "bucket"
    assert not os.path.exists(cwd / "gs:"), "a gs:// path was opened without epath"


def _listing(directory):
    out = {}
    for base, _, files in os.walk(directory):
        for f in files:
            full = os.path.join(base, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, directory)] = fh.read()
    return out


def _copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)


def test_storage_helpers_keep_uris():
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/b/x")
    assert not storage.is_remote("relative/gs://x")
    assert storage.absolute("gs://b/x/") == "gs://b/x"
    assert storage.join("gs://b", "x", "y") == "gs://b/x/y"
    assert storage.normpath("gs://b/x/../y") == "gs://b/y"
    assert storage.dirname("gs://b/x/y.json") == "gs://b/x"
    from mllm_jax.data.paths import OutsideRoot, resolve_image_path
    assert resolve_image_path("gs://b/img", "a/../c.jpg") == "gs://b/img/c.jpg"
    with pytest.raises(OutsideRoot, match="climbs out of"):
        resolve_image_path("gs://b/img", "../c.jpg")
    with pytest.raises(OutsideRoot, match="absolute path outside"):
        resolve_image_path("gs://b/img", "gs://other/c.jpg")
    assert resolve_image_path("gs://b/img", "gs://other/c.jpg",
                              allow_absolute=True) == "gs://other/c.jpg"
    from mllm_jax.convert import load_hf
    with pytest.raises(ValueError, match="read from a local directory"):
        load_hf("gs://b/hf")  # safetensors are memory-mapped: local only, said so


def _pipeline(json_path, tok_dir, workdir=None):
    from mllm_jax.data.image import CLIP_MEAN, CLIP_STD, ImageProcessorConfig
    from mllm_jax.data.llava_json import read_llava_json
    from mllm_jax.data.pipeline import LlavaPipeline
    from mllm_jax.data.tokenizer import load_tokenizer
    cfg = ImageProcessorConfig(mode="pad", size={"shortest_edge": 28}, crop_size=28,
                               image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return LlavaPipeline(read_llava_json(json_path), load_tokenizer(tok_dir), cfg, "vicuna_v1",
                         global_batch_size=4, max_length=256, max_images=1,
                         image_tokens_per_image=4, seed=0, num_workers=2,
                         return_sample_ids=True, workdir=workdir)


def test_llava_json_and_images_on_gcs_give_the_local_batches(gcs, tmp_path):
    from mllm_jax.bench.data import make_mix
    data = tmp_path / "data"
    data.mkdir()
    path, tok = make_mix(str(data), 12, np.random.default_rng(0))
    entries = json.loads(open(path).read())
    # one record whose image is missing: reported in the workdir's data_report files
    missing = next(e for e in entries if "image" in e)
    missing["image"] = "no_such.jpg"
    with open(path, "w") as f:
        json.dump(entries, f)
    _copy_tree(data, gcs / "data")

    local = _pipeline(path, tok, workdir=str(tmp_path / "work"))
    remote = _pipeline(f"{BUCKET}/data/data.json", f"{BUCKET}/data/tok",
                       workdir=f"{BUCKET}/work")
    assert remote.records[0].images == () or \
        all(str(p).startswith(f"{BUCKET}/data/") for r in remote.records for p in r.images)
    for _ in range(3):
        a, b = next(local), next(remote)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert local.report() == remote.report() and local.report()
    local.close()
    remote.close()
    for name in ("data_report.json", "data_report.jsonl"):
        want = (tmp_path / "work" / name).read_text()
        got = (gcs / "work" / name).read_text()
        assert got == want.replace(str(data), f"{BUCKET}/data"), name
    assert missing["id"] in (gcs / "work" / "data_report.jsonl").read_text()


def test_workdir_lock_on_gcs(gcs, monkeypatch):
    from mllm_jax.train import workdir as wd
    monkeypatch.setattr(wd, "REMOTE_SETTLE_S", 0.0)
    work = f"{BUCKET}/runs/a"
    with wd.locked(work, command="train") as info:
        held = json.loads((gcs / "runs/a/train.lock").read_text())
        assert held == info and wd.read_lock(work) == info
        with pytest.raises(wd.WorkdirLockedError, match="gs://bucket/runs/a/train.lock|in use"):
            wd.acquire(work, command="second")
    assert not (gcs / "runs/a/train.lock").exists() and wd.read_lock(work) is None

    # a stale lock of this host (its pid is gone) is taken over, as on a local disk
    stale = dict(info, pid=2 ** 22 + 7, token="old", pid_start=None, boot_id=None)
    (gcs / "runs/a/train.lock").write_text(json.dumps(stale))
    logs = []
    info = wd.acquire(work, log=logs.append)
    assert "taking over the stale lock gs://bucket/runs/a/train.lock" in logs[0]
    wd.release(work, info)

    # a trainer that finds another's lock after writing its own backs off
    real_write = storage.write_atomic

    def raced(path, data, **kw):
        real_write(path, data, **kw)
        real_write(path, json.dumps(dict(stale, host="elsewhere", token="theirs")))

    monkeypatch.setattr(storage, "write_atomic", raced)
    with pytest.raises(wd.WorkdirLockedError, match="elsewhere"):
        wd.acquire(work)


def test_checkpoints_hand_orbax_the_gcs_path(gcs, monkeypatch):
    import ml_collections
    from mllm_jax.train import checkpoints
    seen = []

    class Manager:
        def __init__(self, directory, **kwargs):
            seen.append(directory)

        def all_steps(self, read=False):
            return [3]

        def restore(self, step, args):
            return {"config": {"seed": 1}}

    monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", Manager)
    tc = ml_collections.ConfigDict(dict(keep_checkpoints=2, checkpoint_every=1,
                                        async_checkpointing=False))
    ck = checkpoints.Checkpoints(f"{BUCKET}/run", tc)
    assert seen == [f"{BUCKET}/run/checkpoints"]
    assert ck.step_dir(3) == f"{BUCKET}/run/checkpoints/3"
    assert ck._read_json(3, "config") is None  # no config/ item there: read through epath
    (gcs / "run/checkpoints/3/config").mkdir(parents=True)
    assert ck._read_json(3, "config") == {"seed": 1}


def _tiny():
    from mllm_jax import build_model, presets
    from mllm_jax.models import registry
    cfg = presets.get("tiny-llama")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *registry.init_inputs(cfg))["params"]
    import flax.linen as nn
    return model, nn.meta.unbox(params)


def test_final_export_records_land_on_gcs(gcs, monkeypatch, tmp_path):
    from mllm_jax.convert import orbax_io
    from mllm_jax.infer.chat_template import read_chat_template, write_chat_template
    model, params = _tiny()
    saved = []

    class Checkpointer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def save(self, directory, tree, force=False):
            saved.append(directory)

    monkeypatch.setattr(orbax_io.ocp, "StandardCheckpointer", Checkpointer)
    out = orbax_io.save_orbax(model, params, f"{BUCKET}/run/final", overwrite=True)
    write_chat_template(out, "vicuna_v1")
    assert out == f"{BUCKET}/run/final" and saved == [f"{BUCKET}/run/final/params"]
    local = orbax_io.save_orbax(model, params, str(tmp_path / "final"), overwrite=True)
    write_chat_template(local, "vicuna_v1")
    for name in (orbax_io.CONFIG_FILE, "integrity.json", "tokenizer_config.json"):
        assert (gcs / "run/final" / name).read_bytes() == (tmp_path / "final" / name).read_bytes()
    assert orbax_io.read_model_config(out) == orbax_io.read_model_config(local)
    assert read_chat_template(out).name == "vicuna_v1"


def test_hf_export_to_gcs_matches_local(gcs, tmp_path, capsys):
    from mllm_jax.cli import main
    from mllm_jax.convert import orbax_io, save_hf
    from mllm_jax.infer.chat_template import write_chat_template
    model, params = _tiny()
    src = orbax_io.save_orbax(model, params, str(tmp_path / "orbax"))
    write_chat_template(src, "vicuna_v1")
    assert main(["convert", "orbax-to-hf", src, str(tmp_path / "hf")]) == 0
    assert main(["convert", "orbax-to-hf", src, f"{BUCKET}/hf"]) == 0
    want = _listing(tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(want)
    assert _listing(gcs / "hf") == want
    # the destination must be empty without --overwrite; with it, replaced whole
    assert main(["convert", "orbax-to-hf", src, f"{BUCKET}/hf"]) != 0
    assert "gs://bucket/hf exists and is not empty" in capsys.readouterr().err
    (gcs / "hf" / "stale.txt").write_text("old")
    assert main(["convert", "orbax-to-hf", src, f"{BUCKET}/hf", "--overwrite"]) == 0
    assert _listing(gcs / "hf") == want

    # sharded, straight through save_hf
    save_hf(model, params, str(tmp_path / "sharded"), max_shard_size=20_000)
    save_hf(model, params, f"{BUCKET}/sharded", max_shard_size=20_000)
    want = _listing(tmp_path / "sharded")
    assert "model.safetensors.index.json" in want and _listing(gcs / "sharded") == want
    assert not [p for p in os.listdir(gcs) if p.startswith(".")]  # no staging left behind
