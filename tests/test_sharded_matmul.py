"""`sharding.matmul` under a mesh: each weight is all-gathered over the storage axes for its
product and its gradient comes back reduce-scattered onto the slice each device keeps (read
from the compiled HLO of a scanned decoder's loss and gradient), the "+weights" remat
policies keep the gathered weights for the backward pass, and the numbers equal the
unsharded ones."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import presets, sharding
from mllm_jax.models import registry
from mllm_jax.plan import hlo

LAYERS = 2
WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(remat):
    cfg = presets.get("tiny-llama")
    cfg.scan_layers = True
    cfg.remat_policy = remat
    cfg.text.num_hidden_layers = LAYERS
    return registry.build_model(cfg)


def _inputs():
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 250, (8, 16)))
    params = nn.meta.unbox(_model("none").init(jax.random.PRNGKey(0), ids))
    return params, ids


def _loss(model, params, ids):
    return jnp.mean(jnp.square(model.apply(params, ids)))


@functools.lru_cache(maxsize=None)
def _sharded(remat, sizes, piece_bytes=None):
    """(compiled HLO program, loss, gradients) of the loss under a mesh of `sizes`."""
    model = _model(remat)
    mesh = sharding.make_mesh(sharding.mesh_config(**dict(sizes)))
    params, ids = _inputs()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            sharding.activation_rules_context():
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    specs = nn.meta.unbox(nn.logical_to_mesh_sharding(
        nn.get_partition_spec(boxed), mesh, sharding.LOGICAL_RULES))

    def f(params, ids):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                sharding.activation_rules_context():
            return jax.value_and_grad(functools.partial(_loss, model))(params, ids)

    jitted = jax.jit(f, in_shardings=(specs, NamedSharding(mesh, P(("data", "fsdp")))))
    old = sharding.PIECE_BYTES
    sharding.PIECE_BYTES = piece_bytes or old
    try:
        compiled = jitted.lower(params, ids).compile()
    finally:
        sharding.PIECE_BYTES = old
    value, grads = compiled(params, ids)
    return hlo.Program(compiled.as_text(), 8), value, grads


def _in_loop(program, kind, weight, group):
    return [c for c in program.collectives()
            if c.kind == kind and c.in_loop and c.group == group and f"/{weight}/" in c.op_name]


@pytest.fixture(scope="module")
def reference():
    params, ids = _inputs()
    return jax.jit(jax.value_and_grad(functools.partial(_loss, _model("none"))))(params, ids)


FSDP4 = (("data", 1), ("fsdp", 4), ("tensor", 2))


def test_weight_gradients_are_reduce_scattered_not_all_reduced():
    program, _, _ = _sharded("dots_no_batch", FSDP4)
    for weight in WEIGHTS:
        scattered = _in_loop(program, "reduce-scatter", weight, 4)
        assert sum(c.count for c in scattered) == LAYERS, weight  # once per layer
    # Over the fsdp groups, what remains all-reduced in the layers: the norms' scales.
    reduced = [c for c in program.collectives()
               if c.kind == "all-reduce" and c.in_loop and c.group == 4]
    assert all(c.bytes <= 2 * 64 * 4 for c in reduced), [(c.bytes, c.op_name) for c in reduced]
    # The policy keeps the tensor-parallel sums (o_proj, down_proj): none is redone.
    summed = [c for c in program.collectives() if c.kind == "all-reduce" and c.group == 2
              and "shard_map" in c.op_name]
    assert summed and not [c for c in summed if "rematted_computation" in c.op_name]


def test_plus_weights_policy_gathers_each_weight_once():
    again, _, _ = _sharded("dots_no_batch", FSDP4)  # the forward's, and the backward's
    once, _, _ = _sharded("dots_no_batch+weights", FSDP4)
    for weight in WEIGHTS:
        n_again = sum(c.count for c in _in_loop(again, "all-gather", weight, 4))
        n_once = sum(c.count for c in _in_loop(once, "all-gather", weight, 4))
        assert (n_again, n_once) == (2 * LAYERS, LAYERS), weight


@pytest.mark.parametrize("remat, sizes, piece_bytes", [
    ("dots_no_batch", FSDP4, None),
    ("dots_no_batch+weights", FSDP4, None),
    ("full", (("data", 2), ("fsdp", 2), ("tensor", 2)), None),
    ("none", (("data", 1), ("fsdp", 8), ("tensor", 1)), 2048),  # weights in 2-4 pieces
])
def test_sharded_loss_and_gradients_equal_unsharded(reference, remat, sizes, piece_bytes):
    program, value, grads = _sharded(remat, sizes, piece_bytes)
    ref_value, ref_grads = reference
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    if piece_bytes:
        pieces = _in_loop(program, "all-gather", "gate_proj", 8)
        assert len(pieces) > 1 and all(c.bytes <= piece_bytes for c in pieces)


def test_plain_product_outside_a_mesh_and_under_the_serving_rules():
    x = jnp.ones((8, 16))
    w = jnp.ones((16, 32))
    jaxpr = jax.make_jaxpr(lambda x, w: sharding.matmul(x, w, ("embed", "mlp")))(x, w)
    assert "shard_map" not in str(jaxpr)
    mesh = sharding.make_mesh(sharding.mesh_config(data=1, fsdp=4, tensor=2))
    for rules, split in ((sharding.SERVING_RULES, False), (sharding.LOGICAL_RULES, True)):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            jaxpr = jax.make_jaxpr(lambda x, w: sharding.matmul(x, w, ("embed", "mlp")))(x, w)
        assert ("all_gather" in str(jaxpr)) == split, rules
