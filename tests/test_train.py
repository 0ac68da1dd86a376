"""The training engine end to end on the tiny LLaVA: sharding invariance, frozen trees,
memory under FSDP, the NaN guard, gradient accumulation, DPO and the chunked loss.

Compilation dominates the run time, so each `train()` run is a module fixture that several
tests read, and the runs are few and short (3-4 steps of a batch of 8).
"""
import math
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import llava15_tiny_stage1, llava15_tiny_stage2
from mllm_jax import sharding
from mllm_jax.models import build_model
from mllm_jax.train import flops as flops_lib
from mllm_jax.train import loop, partition, step as step_lib
from mllm_jax.train.losses import IGNORE_INDEX

MESH_222 = dict(data=2, fsdp=2, tensor=2)
MESH_1 = dict(data=1, fsdp=1, tensor=1)


def _config(recipe, mesh=MESH_222, lr=1e-4, **train):
    """A tiny recipe: 3 steps, no warmup (every step moves the parameters), no export.

    The default lr keeps the 1e-5 comparisons meaningful: Adam turns a gradient element
    that is pure rounding noise (|g| ~ eps) into an update of up to lr, whatever the noise.
    """
    c = recipe.get_config()
    c.mesh.update(**mesh)
    c.train.update(lr=lr, warmup_ratio=0.0)
    c.train.update(num_steps=3, export_final=False, checkpoint_every=1000, log_every=1000,
                   async_checkpointing=False)
    c.train.update(**train)
    return c


def _devices(cfg):
    return jax.devices()[:int(np.prod([cfg.mesh[a] for a in sharding.MESH_AXES]))]


def _train(cfg, workdir):
    return loop.train(cfg, str(workdir), log=lambda *_: None, devices=_devices(cfg))


def _flat(tree):
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
        jax.device_get(tree), sep="/").items()}


def _max_diff(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    return max(float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) for k in fa)


def _restore(workdir, step):
    """The TrainState of a checkpoint, as host arrays (a dict tree)."""
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    return jax.device_get(restored["state"]), restored["data"]


# ---- shared runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1_trainer():
    """A stage-1 trainer on one device (not run): initial parameters, compiled step."""
    cfg = _config(llava15_tiny_stage1, MESH_1)
    return cfg, loop.build_trainer(cfg, devices=_devices(cfg))


@pytest.fixture(scope="module")
def init_params(stage1_trainer):
    """The random initial parameters (init seed 0) every run here starts from."""
    _, t = stage1_trainer
    return jax.device_get(partition.merge(t.state.params, t.frozen))


@pytest.fixture(scope="module")
def stage2_sharded(tmp_path_factory):
    return _train(_config(llava15_tiny_stage2), tmp_path_factory.mktemp("s2_222"))


@pytest.fixture(scope="module")
def stage2_one_device(tmp_path_factory):
    return _train(_config(llava15_tiny_stage2, MESH_1), tmp_path_factory.mktemp("s2_1"))


@pytest.fixture(scope="module")
def stage1_nan_run(tmp_path_factory):
    """Stage 1 with batch 1 (step 2) all NaN, a checkpoint after every step."""
    workdir = tmp_path_factory.mktemp("s1_nan")
    cfg = _config(llava15_tiny_stage1, lr=1e-3, checkpoint_every=1, keep_checkpoints=10)
    cfg.data.nan_batches = [1]
    return workdir, _train(cfg, workdir)


# ---- 1. sharding invariance ----------------------------------------------------------------

def test_sharded_run_matches_one_device(stage2_sharded, stage2_one_device, init_params):
    a, b = stage2_sharded, stage2_one_device
    assert a["step"] == b["step"] == 3
    loss_diff = float(np.max(np.abs(np.subtract(a["losses"], b["losses"]))))
    param_diff = _max_diff(a["final_params"], b["final_params"])
    moved = _max_diff(a["final_params"], init_params)
    print(f"8 devices vs 1: loss diff {loss_diff:.3g}, param diff {param_diff:.3g} "
          f"(parameters moved up to {moved:.3g})")
    assert loss_diff < 1e-5 and param_diff < 1e-5
    # ... and the comparison is not vacuous: the parameters moved far more than that.
    assert moved > 1e-4
    # The run really was sharded: a 2-D LLM weight is split over fsdp x tensor.
    q = a["final_params"]["language_model"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size == q.size // 4


# ---- 2. stage 1: frozen trees ----------------------------------------------------------------

def test_stage1_frozen_params_unchanged_and_no_optimizer_state(stage1_nan_run, init_params):
    _, summary = stage1_nan_run
    assert summary["step"] == 3
    final, init = _flat(summary["final_params"]), _flat(init_params)
    assert final.keys() == init.keys()
    trainable = [k for k in final if k.startswith("multi_modal_projector/")]
    frozen = [k for k in final if k not in trainable]
    assert trainable and len(frozen) > len(trainable)
    for k in frozen:
        assert final[k].dtype == init[k].dtype and np.array_equal(final[k], init[k]), k
    assert all(not np.array_equal(final[k], init[k]) for k in trainable)

    state = summary["state"]
    assert set(state.params) == {"multi_modal_projector"}
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    leaves = jax.tree_util.tree_leaves(state.opt_state)
    scalars = [x for x in leaves if x.ndim == 0]
    assert 0 < len(scalars) <= 4  # step counters (Adam, schedule), nothing else
    # Adam's two moments for the trainable leaves, nothing for the frozen ones.
    assert sum(x.size for x in leaves) == 2 * n_trainable + len(scalars)
    trainable_shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(state.params))
    assert sorted(x.shape for x in leaves if x.ndim) == sorted(trainable_shapes * 2)


def _step_flops(trainer, local_batch):
    compiled = trainer.jit_step(local_batch).lower(
        trainer.state, trainer.frozen, trainer.frozen_extra,
        trainer.global_batch(local_batch)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_stage1_step_computes_no_frozen_weight_gradients(stage1_trainer, init_params):
    cfg1, t1 = stage1_trainer
    cfg2 = _config(llava15_tiny_stage2, MESH_1)
    t2 = loop.build_trainer(cfg2, devices=_devices(cfg2), params=init_params)
    data = loop.make_data(cfg1, 0, 1)
    local = next(data)
    f1, f2 = _step_flops(t1, local), _step_flops(t2, local)

    # The matmul model: stage 1 = vision fwd + projector fwd/wgrad + LLM fwd/dgrad;
    # stage 2 adds the LLM's weight gradients (another LLM forward's worth).
    expected = [flops_lib.train_step_flops(c.model, c.train.global_batch_size, data.seq_len,
                                           1, t.state.params)
                for c, t in ((cfg1, t1), (cfg2, t2))]
    ratio, expected_ratio = f1 / f2, expected[0] / expected[1]
    print(f"step FLOPs stage1 {f1:.4g} stage2 {f2:.4g} ratio {ratio:.3f} "
          f"(matmul model {expected_ratio:.3f})")
    assert 0.6 < expected_ratio < 0.75
    # XLA also counts elementwise work and the loss chunks' recomputed logits.
    assert abs(ratio - expected_ratio) < 0.05
    assert ratio < 0.75


def test_step_applies_the_activation_sharding_constraints():
    """The models' logical activation constraints reach the traced step: batch over
    (data, fsdp), vocabulary over tensor, on a (2, 2, 2) mesh."""
    cfg = _config(llava15_tiny_stage1, MESH_222)
    t = loop.build_trainer(cfg, devices=_devices(cfg))
    local = next(loop.make_data(cfg, 0, 1))
    text = t.jit_step(local).lower(t.state, t.frozen, t.frozen_extra,
                                   t.global_batch(local)).as_text()
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert any('{"data", "fsdp"}' in line for line in constraints), constraints[:5]


# ---- 3. FSDP memory ------------------------------------------------------------------------

def test_fsdp8_splits_parameters_and_optimizer_state():
    cfg = _config(llava15_tiny_stage2, dict(data=1, fsdp=8, tensor=1))
    m = cfg.model  # every sharded dimension of the tiny LLaVA is a multiple of 8
    assert m.text.hidden_size % 8 == 0 and m.vision.hidden_size % 8 == 0
    t = loop.build_trainer(cfg, devices=_devices(cfg))
    tree = (t.state, t.frozen)
    per_device = sharding.bytes_per_device(tree)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    assert len(per_device) == 8
    ratio = max(per_device.values()) / (total / 8)
    print(f"fsdp=8: {total} bytes in total, at most {max(per_device.values())} per device "
          f"({ratio:.3f} x total/8)")
    assert ratio <= 1.15
    # Every matrix (parameters and Adam moments) is split 8 ways; only vectors along
    # tensor-parallel axes (mlp/heads biases) stay replicated on a tensor=1 mesh.
    for path, x in _flat_arrays(tree).items():
        if x.ndim >= 2:
            assert x.addressable_shards[0].data.size * 8 == x.size, path


def _flat_arrays(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): x for p, x in leaves}


# ---- 4. NaN guard --------------------------------------------------------------------------

def test_nan_batch_is_skipped_and_counted(stage1_nan_run):
    workdir, summary = stage1_nan_run
    losses = summary["losses"]
    assert summary["nan_skipped"] == 1 and summary["step"] == 3
    assert math.isnan(losses[1]) and math.isfinite(losses[0]) and math.isfinite(losses[2])
    before, _ = _restore(workdir, 1)
    after, data_state = _restore(workdir, 2)
    assert data_state["next_index"] == 2
    assert int(after["nan_skipped"]) == 1 and int(after["nan_streak"]) == 1
    # The skipped step left parameters and optimizer state bitwise as they were.
    for part in ("params", "opt_state"):
        a, b = jax.tree_util.tree_leaves(before[part]), jax.tree_util.tree_leaves(after[part])
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), part
    # Training went on: step 3 changed them again, and everything is finite.
    final = _flat(summary["state"].params)
    assert any(not np.array_equal(final[k], v) for k, v in _flat(after["params"]).items())
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert int(summary["state"].nan_streak) == 0


def test_nan_streak_stops_with_last_good_checkpoint(tmp_path):
    # Steps 1-2 good (checkpoint 2), steps 3-5 NaN (checkpoint 4 falls inside the streak).
    cfg = _config(llava15_tiny_stage1, lr=1e-3, num_steps=8, max_nan_streak=3,
                  checkpoint_every=2)
    cfg.data.nan_batches = [2, 3, 4]
    with pytest.raises(loop.TrainingStopped) as err:
        _train(cfg, tmp_path)
    msg = str(err.value)
    ckpt_dir = os.path.join(str(tmp_path), "checkpoints")
    assert "at step 5" in msg and ckpt_dir in msg and "(step 4)" in msg, msg
    good, good_data = _restore(str(tmp_path), 2)
    newest, newest_data = _restore(str(tmp_path), 4)
    assert int(good["step"]) == 2 and int(good["nan_skipped"]) == 0
    assert good_data["next_index"] == 2
    assert int(newest["step"]) == 4 and int(newest["nan_skipped"]) == 2
    # The last good checkpoint restores whole, and the newest one (inside the streak) holds
    # exactly its parameters and optimizer state.
    for part in ("params", "opt_state"):
        a, b = jax.tree_util.tree_leaves(good[part]), jax.tree_util.tree_leaves(newest[part])
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), part
    assert all(np.all(np.isfinite(v)) for v in _flat(good["params"]).values())


# ---- 5. gradient accumulation --------------------------------------------------------------

def test_micro_batches_match_one_batch(tmp_path, stage2_sharded):
    accum = _train(_config(llava15_tiny_stage2, micro_batches=2), tmp_path)
    loss_diff = float(np.max(np.abs(np.subtract(accum["losses"], stage2_sharded["losses"]))))
    param_diff = _max_diff(accum["final_params"], stage2_sharded["final_params"])
    print(f"micro_batches 2 vs 1: loss diff {loss_diff:.3g}, param diff {param_diff:.3g}")
    assert loss_diff < 1e-5 and param_diff < 1e-5


# ---- 6. DPO --------------------------------------------------------------------------------

def test_dpo_starts_at_log2_and_learns(tmp_path):
    cfg = _config(llava15_tiny_stage2, MESH_1, lr=1e-3, num_steps=4)
    cfg.stage.objective = "dpo"
    cfg.stage.objective_kwargs = {"beta": 0.5}
    cfg.data.distinct_batches = 1  # the same preference pairs every step: learnable
    summary = _train(cfg, tmp_path)
    losses = summary["losses"]
    print("DPO losses", losses)
    assert abs(losses[0] - math.log(2)) < 1e-6  # policy == reference
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < math.log(2) - 0.05


# ---- 7. the chunked loss against a plain one -----------------------------------------------

def test_chunked_loss_equals_full_logits_reference(init_params, stage2_one_device):
    cfg = _config(llava15_tiny_stage2, MESH_1)
    model = build_model(cfg.model)
    data = loop.make_data(cfg, 0, 1)
    batch = data.global_batch(0)  # the first batch of every run here
    seq = data.seq_len
    chunks = (512, seq, 16, 7, 5)  # 33 = 4*7 + 5 = 6*5 + 3: ragged last chunks
    assert seq == 33

    @jax.jit
    def losses(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                             batch["attention_mask"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]
        targets = batch["labels"][:, 1:]
        valid = targets != IGNORE_INDEX
        picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
        reference = (-jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid))
        chunked = [step_lib.lm_objective(model, params, batch, {}, chunk_size=c)[:2]
                   for c in chunks]
        return reference, chunked

    (ref_sum, ref_n), chunked = jax.device_get(losses(init_params, batch))
    ref = ref_sum / ref_n
    assert ref_n > 0
    diffs = {c: abs(float(lsum / n) - float(ref)) for c, (lsum, n) in zip(chunks, chunked)}
    trainer_diff = abs(stage2_one_device["losses"][0] - float(ref))
    print(f"loss {float(ref):.6f}; chunked - full-logits reference by chunk size: {diffs}; "
          f"trainer's first loss - reference: {trainer_diff:.3g}")
    for c, (_, n) in zip(chunks, chunked):
        assert int(n) == int(ref_n), c
        assert diffs[c] < 1e-5, c
    # The trainer reports the same loss for the same batch and initial parameters.
    assert trainer_diff < 1e-5
