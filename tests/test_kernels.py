"""Hand-written gradients (attention, output projection + log-softmax) equal the gradients
JAX derives from the plain formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models import attention
from mllm_jax.train import losses


def _plain_attention(q, k, v, mask, scale):
    b, s, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, s, kvh, h // kvh, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, -1)
    return jnp.einsum("bhgqk,bkhd->bqhgd", p, v).reshape(b, s, h, d)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("masking", ["causal", "left_padding", "segments"])
def test_attention_matches_plain_formula_and_its_gradient(kv_heads, masking):
    r = np.random.RandomState(kv_heads)
    b, s, h, d = 2, 9, 4, 8
    q = jnp.asarray(r.randn(b, s, h, d), jnp.float32)
    k = jnp.asarray(r.randn(b, s, kv_heads, d), jnp.float32)
    v = jnp.asarray(r.randn(b, s, kv_heads, d), jnp.float32)
    kw = {}
    if masking == "left_padding":  # rows 0-2 of sample 0 see no key at all
        kw["attention_mask"] = jnp.asarray([[0, 0, 0] + [1] * 6, [1] * 9])
    if masking == "segments":
        kw["segment_ids"] = jnp.asarray([[1] * 4 + [2] * 5, [1] * 2 + [2] * 3 + [0] * 4])
    mask = attention.make_attention_mask(s, causal=True, **kw)
    w = jnp.asarray(r.randn(b, s, h, d), jnp.float32)
    ours = attention.dot_product_attention(q, k, v, mask, 0.35)
    plain = _plain_attention(q, k, v, mask, 0.35)
    np.testing.assert_allclose(ours, plain, atol=1e-6)
    g_ours = jax.grad(lambda *a: jnp.sum(attention.dot_product_attention(*a, mask, 0.35) * w),
                      (0, 1, 2))(q, k, v)
    g_plain = jax.grad(lambda *a: jnp.sum(_plain_attention(*a, mask, 0.35) * w),
                       (0, 1, 2))(q, k, v)
    for a, p in zip(g_ours, g_plain):
        assert float(jnp.abs(p).max()) > 0
        np.testing.assert_allclose(a, p, atol=2e-5)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_linear_target_logprobs_matches_log_softmax_and_its_gradient(vocab_major):
    r = np.random.RandomState(0)
    n, d, vocab = 13, 8, 37
    h = jnp.asarray(r.randn(n, d), jnp.float32)
    w = jnp.asarray(r.randn(vocab, d) if vocab_major else r.randn(d, vocab), jnp.float32)
    t = jnp.asarray(r.randint(0, vocab, n)).at[jnp.asarray([2, 7])].set(losses.IGNORE_INDEX)
    g = jnp.asarray(r.randn(n), jnp.float32)

    def plain(h, w):
        logits = h @ (w.T if vocab_major else w)
        lp = jax.nn.log_softmax(logits, -1)
        picked = jnp.take_along_axis(lp, jnp.maximum(t, 0)[:, None], -1)[:, 0]
        return jnp.where(t != losses.IGNORE_INDEX, picked, 0.0)

    ours = losses.linear_target_logprobs(h, w, t, vocab_major)
    np.testing.assert_allclose(ours, plain(h, w), atol=1e-5)
    assert float(ours[2]) == 0.0 and float(ours[7]) == 0.0
    go = jax.grad(lambda h, w: jnp.sum(losses.linear_target_logprobs(h, w, t, vocab_major) * g),
                  (0, 1))(h, w)
    gp = jax.grad(lambda h, w: jnp.sum(plain(h, w) * g), (0, 1))(h, w)
    for a, p in zip(go, gp):
        np.testing.assert_allclose(a, p, atol=1e-5)


def test_chunked_loss_equals_one_chunk_with_gradients():
    r = np.random.RandomState(1)
    hidden = jnp.asarray(r.randn(3, 11, 8), jnp.float32)
    w = jnp.asarray(r.randn(8, 29), jnp.float32)
    labels = jnp.asarray(r.randint(0, 29, (3, 11))).at[:, :4].set(losses.IGNORE_INDEX)

    def loss(hidden, w, chunk):
        s, n = losses.masked_lm_loss(hidden, labels, (w, False), chunk)
        return s / n

    ref, gref = jax.value_and_grad(loss, (0, 1))(hidden, w, 10 ** 6)
    for chunk in (5, 7, 33):
        val, g = jax.value_and_grad(loss, (0, 1))(hidden, w, chunk)
        np.testing.assert_allclose(val, ref, atol=1e-6)
        for a, b in zip(g, gref):
            np.testing.assert_allclose(a, b, atol=1e-6)


def _blocked_attention(q, k, v, mask, block):
    return attention.causal_self_attention(q, k, v, mask, 0.3, block_size=block)


# Compiled once for the three maskings (the mask is an argument, the block size static).
_blocked = jax.jit(_blocked_attention, static_argnums=4)
_blocked_grad = jax.jit(jax.grad(lambda q, k, v, mask, w, block: jnp.sum(
    _blocked_attention(q, k, v, mask, block) * w), (0, 1, 2)), static_argnums=5)
_full_grad = jax.jit(jax.grad(lambda q, k, v, mask, w: jnp.sum(
    attention.dot_product_attention(q, k, v, mask, 0.3) * w), (0, 1, 2)))


@pytest.mark.parametrize("masking", ["causal", "left_padding", "segments"])
def test_blocked_causal_attention_equals_full_attention(masking):
    """Skipping the keys after each query block changes nothing for queries that attend to
    something (padding queries, which attend to nothing, are excluded), values and
    gradients alike; block sizes that do not divide the length included."""
    r = np.random.RandomState(7)
    b, s, h, kvh, d = 2, 21, 4, 2, 8
    q, k, v = (jnp.asarray(r.randn(b, s, n, d), jnp.float32) for n in (h, kvh, kvh))
    kw = {}
    if masking == "left_padding":
        kw["attention_mask"] = jnp.asarray([[0] * 5 + [1] * 16, [1] * 21])
    if masking == "segments":
        kw["segment_ids"] = jnp.asarray([[1] * 9 + [2] * 12, [1] * 4 + [2] * 17])
    mask = attention.make_attention_mask(s, causal=True, **kw)
    live = jnp.any(mask, axis=-1)[:, 0][:, :, None, None]  # [b, s, 1, 1]: attends somewhere
    w = jnp.asarray(r.randn(b, s, h, d), jnp.float32) * live
    full = attention.dot_product_attention(q, k, v, mask, 0.3)
    gf = _full_grad(q, k, v, mask, w)
    for block in (4, 5, 8, 20):
        np.testing.assert_allclose(_blocked(q, k, v, mask, block) * live, full * live,
                                   atol=1e-6)
        gb = _blocked_grad(q, k, v, mask, w, block)
        for a, p in zip(gb, gf):
            np.testing.assert_allclose(a, p, atol=2e-5)
