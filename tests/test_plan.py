"""`mllm-jax plan`: counting a compiled program from its HLO (loops weighted by their trip
counts, collectives by kind), and, with libtpu installed, a tiny model's training step
compiled for a TPU topology with the plan's fields checked."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import sharding
from mllm_jax.plan import hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_of_a_scanned_program_count_every_iteration():
    """XLA's cost_analysis counts a loop body once; the plan counts it per trip."""
    layers, n, d = 6, 8, 32

    def f(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    ws = jax.ShapeDtypeStruct((layers, d, d), jnp.float32)
    compiled = jax.jit(f).lower(x, ws).compile()
    program = hlo.Program(compiled.as_text())
    assert program.unknown_trip_counts == 0
    assert program.flops() == layers * 2 * n * d * d
    assert compiled.cost_analysis()["flops"] < program.flops()  # what the plan corrects


def test_collectives_by_kind_with_their_bytes_and_groups():
    mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=4, tensor=1))
    w_sh = NamedSharding(mesh, P("fsdp", None))
    rows = NamedSharding(mesh, P(("data", "fsdp")))

    def f(x, w):  # FSDP: the weight all-gathered over fsdp, the gradient reduce-scattered
        return jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)

    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=rows)
    w = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=w_sh)
    compiled = jax.jit(f, out_shardings=w_sh).lower(x, w).compile()
    found = hlo.Program(compiled.as_text(), 8).collectives()
    kinds = {c.kind for c in found}
    assert kinds & {"all-gather", "all-reduce", "reduce-scatter"}, found
    gather = [c for c in found if c.kind == "all-gather"]
    assert gather and gather[0].bytes == 64 * 128 * 4 and gather[0].group == 4
    assert gather[0].wire_bytes == pytest.approx(64 * 128 * 4 * 3 / 4)
    assert all(not c.in_loop and c.count == 1 for c in found)


def test_trip_count_from_the_loop_condition():
    text = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p.1 = (s32[], f32[4]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %x = f32[4] get-tuple-element(%p.1), index=1
  %m = f32[4,4] broadcast(%x), dimensions={1}
  %y = f32[4] dot(%m, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = f32[4] all-reduce(%y), replica_groups={{0,1}}, to_apply=%add
  %one = s32[] constant(1)
  %i.2 = s32[] add(%i.1, %one)
  ROOT %t = (s32[], f32[4]) tuple(%i.2, %ar)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %start = s32[] constant(2)
  %init = (s32[], f32[4]) tuple(%start, %a)
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4] get-tuple-element(%w), index=1
}
"""
    program = hlo.Program(text, 2)
    assert program.flops() == 10 * 2 * 4 * 4  # iterations 2..11
    (ar,) = program.collectives()
    assert (ar.kind, ar.bytes, ar.group, ar.count, ar.in_loop) == ("all-reduce", 16, 2, 10,
                                                                   True)
    # A loop unrolled by XLA adds 2 to its counter: 2, 4, ..., 10.
    unrolled = hlo.Program(text.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)"))
    assert unrolled.flops() == 5 * 2 * 4 * 4


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>')")
def test_plan_compiles_a_tiny_training_step_for_a_tpu_topology():
    """The training step, then the prefill and decode step with the serving rules."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, TPU_SKIP_MDS_QUERY="1")
    env.pop("JAX_PLATFORMS", None)  # the command sets it
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "mllm_jax.cli", "plan", "--config",
         os.path.join(ROOT, "configs", "llava15_tiny_stage2.py"), "--topology", "v5e:2x2",
         "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
         "--decode", "16", "1024"],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    plan, prefill, step = (json.loads(line) for line in lines[-3:])
    assert "memory per chip" in out.stdout and "ICI floor" in out.stdout  # the table
    assert plan["compiles"] and plan["topology"] == "v5e:2x2" and plan["devices"] == 4
    assert plan["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert 0 < plan["memory_bytes_per_device"] < plan["hbm_bytes_per_device"] == 16e9
    assert plan["flops_per_device"] > 0 and plan["model_flops_per_device"] > 0
    # The tiny model's attention and remat recomputation are a large share of its FLOPs.
    assert 0.8 < plan["flops_per_device"] / plan["model_flops_per_device"] < 3
    kinds = plan["collective_bytes_per_device"]
    assert kinds.get("all-gather", 0) > 0  # FSDP gathers the weights
    assert plan["compute_s_at_peak"] == pytest.approx(plan["flops_per_device"] / 197e12)
    assert plan["ici_floor_s"] > 0 and plan["unknown_trip_counts"] == 0
    assert np.isfinite(plan["ici_over_compute"])

    assert (prefill["program"], step["program"]) == ("prefill", "decode_step")
    # Serving: weights over tensor only, the widest axis the tiny model's KV heads divide.
    assert step["mesh"]["tensor"] == 2 and step["rules"] == "serving"
    assert step["kv_cache_dtype"] == "bfloat16" and step["cache_donated"]
    assert step["memory_detail"]["temporaries"] < step["kv_cache_bytes_per_device"]
    assert step["weight_bytes_per_device"] > 0 and step["hbm_floor_s"] > 0
    # Nothing is gathered per token: neither the weights nor the cache.
    assert step["collective_bytes_per_device"].get("all-gather", 0) < 0.01 * (
        step["weight_bytes_per_device"] + step["kv_cache_bytes_per_device"])
