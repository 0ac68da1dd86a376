"""The chunked loss under a mesh: each chunk is every device's own rows, so the output
projection adds no [chunk, vocab] collective (read from the compiled HLO of the sharded
loss and gradient), and the numbers equal the unsharded ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import sharding
from mllm_jax.plan import hlo
from mllm_jax.train import losses

B, S, D, V, CHUNK = 8, 32, 16, 256, 16


def _inputs():
    r = np.random.RandomState(0)
    hidden = jnp.asarray(r.randn(B, S, D), jnp.float32)
    w = jnp.asarray(r.randn(D, V) * 0.3, jnp.float32)
    labels = np.asarray(r.randint(0, V, (B, S)), np.int32)
    labels[:, :5] = losses.IGNORE_INDEX
    return hidden, w, jnp.asarray(labels)


def _loss(hidden, w, labels):
    s, n = losses.masked_lm_loss(hidden, labels, (w, False), CHUNK)
    return s / n


def _compiled(mesh):
    def f(hidden, w, labels):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                sharding.activation_rules_context():
            return jax.value_and_grad(_loss, (0, 1))(hidden, w, labels)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    head = NamedSharding(mesh, P("fsdp", "tensor"))  # the head's [embed, vocab] sharding
    jitted = jax.jit(f, in_shardings=(rows, head, rows))
    hidden, w, labels = _inputs()
    return jitted, jitted.lower(hidden, w, labels).compile()


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2, tensor=2), dict(data=4, fsdp=2)])
def test_loss_chunks_need_no_vocab_collective(sizes):
    mesh = sharding.make_mesh(sharding.mesh_config(**sizes))
    jitted, compiled = _compiled(mesh)
    program = hlo.Program(compiled.as_text(), 8)
    in_loop = [c for c in program.collectives() if c.in_loop]
    rows = B // (mesh.shape["data"] * mesh.shape["fsdp"])
    chunks = rows * S // CHUNK  # the device's own tokens, CHUNK at a time
    assert max(m for m, _ in program.weights.values()) == chunks  # the chunk loop ran
    if mesh.shape["tensor"] == 1:
        assert in_loop == [], [(c.kind, c.bytes) for c in in_loop]
    else:
        # With the vocabulary split over `tensor`, what tensor parallelism needs: the
        # softmax statistics (a float32 per token) and the partial sums of the hidden
        # states' gradient ([chunk, embed]); never the [chunk, vocab] logits.
        found = [(c.kind, c.bytes) for c in in_loop]
        assert all(kind == "all-reduce" for kind, _ in found), found
        per_chunk = sum(n for _, n in found) / 2  # forward (recomputed) and backward
        assert per_chunk <= 4 * CHUNK * (D + 2) < 4 * CHUNK * V // 2, found
    # Outside the chunks: the head gathered once and its gradient reduced once.
    w_bytes = D * V * 4
    outside = sum(c.bytes * c.count for c in program.collectives() if not c.in_loop)
    assert outside <= 3 * w_bytes

    ref_val, ref_grads = jax.value_and_grad(_loss, (0, 1))(*_inputs())
    val, grads = jitted(*_inputs())
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
