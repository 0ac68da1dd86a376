"""The abstract trainer: `build_trainer(cfg, abstract=True)` builds the state, frozen trees and
step from shapes and shardings alone, so a step compiles ahead of time for devices that hold
no arrays (here: a (2, 2, 2) mesh of the simulated CPU devices, and a TPU v5e topology when
libtpu is installed)."""
import importlib.util
import textwrap

import jax
import numpy as np
import pytest

from mllm_jax.data.sources import make_data
from mllm_jax.train import recipe
from mllm_jax.train.loop import build_trainer
from tpu_script import run_tpu_script


def _config(objective="lm"):
    c = recipe.base("tiny-llava")
    c.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
    c.stage.objective = objective
    c.train.update(global_batch_size=8, num_steps=4)
    c.data.text_len = 16
    c.mesh.update(data=2, fsdp=2, tensor=2)
    return c


def _live_bytes():
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.parametrize("objective", ["lm", "dpo"])
def test_abstract_step_compiles_placing_nothing(objective):
    cfg = _config(objective)
    batch = next(make_data(cfg, 0, 1))
    before = _live_bytes()
    t = build_trainer(cfg, abstract=True)
    leaves = jax.tree_util.tree_leaves((t.state, t.frozen, t.frozen_extra))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    compiled = t.jit_step(batch).lower(t.state, t.frozen, t.frozen_extra,
                                       t.abstract_batch(batch)).compile()
    # Nothing was placed on a device (arrays an earlier test left may be freed meanwhile).
    assert _live_bytes() <= before
    stats = compiled.memory_analysis()

    # The same step built for real: the abstract trees carry the very shapes and
    # shardings of the placed ones, and the two compiled programs are the same size.
    real = build_trainer(cfg)
    describe = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: (x.shape, x.dtype, x.sharding), tree)
    for ours, theirs in ((t.state, real.state), (t.frozen, real.frozen),
                         (t.frozen_extra, real.frozen_extra)):
        assert describe(ours) == describe(theirs)
    placed = real.jit_step(batch).lower(real.state, real.frozen, real.frozen_extra,
                                        real.global_batch(batch)).compile().memory_analysis()
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
        assert getattr(stats, field) == getattr(placed, field), field
    # Each device holds a share of what the step reads (8 devices, fsdp x tensor = 4).
    assert 0 < stats.argument_size_in_bytes < _tiny_llava_state_bytes()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>')")
def test_abstract_step_compiles_for_a_tpu_topology():
    """A TPU v5e 2x2 program, compiled on this machine: its per-chip argument bytes are
    those of the state, frozen trees and batch split over the (data, fsdp, tensor) mesh."""
    script = textwrap.dedent("""
        import json, jax
        from jax.experimental import topologies
        from mllm_jax.data.sources import make_data
        from mllm_jax.train import recipe
        from mllm_jax.train.loop import build_trainer
        c = recipe.base("tiny-llava")
        c.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
        c.train.update(global_batch_size=8, num_steps=4)
        c.data.text_len = 16
        c.mesh.update(data=2, fsdp=2, tensor=1)
        devices = topologies.get_topology_desc("v5e:2x2", "tpu").devices
        batch = next(make_data(c, 0, 1))
        t = build_trainer(c, devices=devices, abstract=True)
        compiled = t.jit_step(batch).lower(t.state, t.frozen, t.frozen_extra,
                                           t.abstract_batch(batch)).compile()
        m = compiled.memory_analysis()
        print(json.dumps({"platform": devices[0].platform, "args": m.argument_size_in_bytes,
                          "temp": m.temp_size_in_bytes}))
    """)
    result = run_tpu_script(script)
    assert result["platform"] == "tpu" and result["args"] > 0
    total = _tiny_llava_state_bytes()
    # 4 chips: every chip holds at least a quarter of the parameters and optimizer state.
    assert total / 4 <= result["args"] < total


def _tiny_llava_state_bytes():
    cfg = _config()
    t = build_trainer(cfg, abstract=True)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves((t.state, t.frozen)))
