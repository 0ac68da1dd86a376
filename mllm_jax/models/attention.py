"""Masks and dot-product attention (float32 softmax, grouped-query heads).

Causal self-attention over whole sequences (training, prefill) goes through
`self_attention_mask` and `self_attention`, which pick this file's XLA path or the Pallas
kernel of `models.splash` by the `model.attention` setting.
"""
from functools import partial

import jax
import jax.numpy as jnp

from mllm_jax.models import splash


def make_attention_mask(q_len, kv_len=None, *, causal: bool, attention_mask=None,
                        segment_ids=None, sliding_window=None, q_offset=0):
    """Boolean mask [batch|1, 1, q, kv]: True where a query may attend to a key.

    attention_mask: [batch, kv] with 1 for real tokens and 0 for padding (HF convention).
    segment_ids: [batch, kv] ints; tokens attend only within their own segment (packing,
      separate images). Queries are the last `q_len` positions of the keys.
    """
    kv_len = q_len if kv_len is None else kv_len
    mask = jnp.ones((1, 1, q_len, kv_len), bool)
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len) + q_offset
    k_pos = jnp.arange(kv_len)[None, :]
    if causal:
        mask = mask & (k_pos <= q_pos)[None, None]
    if sliding_window is not None:
        # HF keeps keys with q - k < window.
        mask = mask & (q_pos - k_pos < sliding_window)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        q_seg = segment_ids[:, -q_len:] if segment_ids.shape[1] != q_len else segment_ids
        mask = mask & (q_seg[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def self_attention_mask(implementation: str, seq: int, *, attention_mask=None,
                        segment_ids=None, sliding_window=None):
    """The mask `self_attention` takes for causal self-attention over [batch, seq] tokens:
    the dense boolean mask of `make_attention_mask` for "xla", the per-token segments of
    `splash.segment_mask` for the kernel. `implementation` is `splash.resolve`'s answer."""
    if implementation == "xla":
        return make_attention_mask(seq, causal=True, attention_mask=attention_mask,
                                   segment_ids=segment_ids, sliding_window=sliding_window)
    return splash.segment_mask(seq, attention_mask, segment_ids, sliding_window=sliding_window,
                               interpret=implementation == "splash_interpret")


def self_attention(q, k, v, mask, scale: float):
    """Causal self-attention of q [b, s, h, d] over k, v [b, s, kv_heads, d] (a sequence's
    own keys): the Pallas kernel when `mask` is a `splash.SegmentMask`, else
    `causal_self_attention` with the dense mask's first s key columns (a prefill mask spans
    the whole KV cache)."""
    if isinstance(mask, splash.SegmentMask):
        return splash.causal_attention(q, k, v, mask, scale)
    return causal_self_attention(q, k, v, mask[..., :q.shape[1]], scale)


def init_kv_cache(batch, max_len, kv_heads, head_dim, dtype):
    """An empty KV cache for one attention layer: keys/values [batch, kv_heads, max_len,
    head_dim] (heads before positions, the layout the attention reads without a transpose,
    as HF's cache) and `index`, the slot where the next tokens are written (shared by the
    batch: prompts are left padded, so every sample writes the same slots)."""
    zeros = jnp.zeros((batch, kv_heads, max_len, head_dim), dtype)
    return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32)}


def write_kv_cache(cache, k, v):
    """Writes k, v [b, s, kv_heads, d] at slots index..index+s-1.

    A cache with a `layer` entry holds every layer's keys/values stacked on a leading axis
    ([layers, b, kv_heads, len, d], a scanned decoder's carry): only the new slots of that
    layer are written, in place, so a decode step never copies the whole cache. The index
    is advanced by the decoder once per call, not here."""
    i = cache["index"]
    zero = jnp.zeros((), jnp.int32)
    layer = cache.get("layer")
    start = (zero, zero, i, zero) if layer is None else (layer, zero, zero, i, zero)

    def put(c, x):
        x = x.transpose(0, 2, 1, 3).astype(c.dtype)
        return jax.lax.dynamic_update_slice(c, x if layer is None else x[None], start)
    return {**cache, "k": put(cache["k"], k), "v": put(cache["v"], v)}


def cached_kv(cache):
    """The keys and values [b, kv_heads, len, d] of the cache's layer."""
    layer = cache.get("layer")
    if layer is None:
        return cache["k"], cache["v"]
    return (jax.lax.dynamic_index_in_dim(cache["k"], layer, keepdims=False),
            jax.lax.dynamic_index_in_dim(cache["v"], layer, keepdims=False))


def cached_attention(q, k, v, mask, scale: float):
    """Attention of q [b, q, h, d] over a KV cache k, v [b, kv_heads, len, d] (see
    `init_kv_cache`); mask broadcastable to [b, 1, q, len]. Forward only (generation)."""
    return _from_groups(_attend(_to_groups(q, k.shape[1]), k, v, mask, scale)[0])


def dot_product_attention(q, k, v, mask, scale: float):
    """q: [b, q, h, d]; k, v: [b, kv, kv_heads, d]; mask broadcastable to [b, 1, q, kv].

    Query heads are grouped over the key/value heads (GQA) without copying k and v.
    Softmax is computed in float32. Rows with no allowed key (padding queries) get uniform
    weights instead of NaN, as HF's eager attention does with its finite minimum.
    The backward pass is written out (see `_attention_bwd`): it reduces over the head
    dimension instead of the key axis, which XLA's derived backward does not find.
    """
    return _attention(q, k, v, mask, scale)


def causal_self_attention(q, k, v, mask, scale: float, block_size: int = 128):
    """Causal self-attention (queries and keys of one sequence) that skips, per block of
    `block_size` queries, the keys after the block: they are masked anyway, and on a
    512-token sequence this removes about 40% of the score and weight work.

    Same result as `dot_product_attention` for every query that may attend to some key;
    a query that may attend to none (padding) averages over its block's keys instead of
    all keys, and its output is never used.
    """
    s = q.shape[1]
    if k.shape[1] != s or s <= block_size:
        return dot_product_attention(q, k, v, mask, scale)
    ends = list(range(block_size, s, block_size)) + [s]
    outs, start = [], 0
    for end in ends:
        m = mask[:, :, start:end, :end] if mask.shape[2] != 1 else mask[..., :end]
        outs.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], m, scale))
        start = end
    return jnp.concatenate(outs, axis=1)


def _to_groups(q, kv_heads):
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _from_groups(x):
    b, kvh, g, s, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, s, kvh * g, d)


def _attend(qg, kt, vt, mask, scale):
    """qg [b, kv_heads, groups, q, d], kt/vt [b, kv_heads, kv, d] -> (out in qg's layout,
    unnormalized weights, 1/row sums)."""
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kt, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None, :, :], scores * jnp.float32(scale),
                       jnp.finfo(jnp.float32).min)
    # Unnormalized weights; the 1/sum is applied to the [q, d] output instead of the
    # [q, kv] weights (the same softmax, fewer divisions).
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    inv = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", e.astype(vt.dtype), vt,
                     preferred_element_type=jnp.float32) * inv
    return out.astype(vt.dtype), e, inv


def _attention_fwd(q, k, v, mask, scale):
    qg = _to_groups(q, k.shape[2])  # [b, kv_heads, groups, q, d]
    kt = k.transpose(0, 2, 1, 3)  # [b, kv_heads, kv, d]
    vt = v.transpose(0, 2, 1, 3)
    out, e, inv = _attend(qg, kt, vt, mask, scale)
    return _from_groups(out), (qg, kt, vt, e, inv, out, mask)


def _attention_bwd(scale, residuals, d_out):
    qg, kt, vt, e, inv, out, mask = residuals
    do = _to_groups(d_out, kt.shape[1]).astype(out.dtype)
    # P = e * inv; dV = P^T dO = e^T (dO * inv).
    dv = jnp.einsum("bhgqk,bhgqd->bhkd", e.astype(vt.dtype), (do * inv).astype(vt.dtype))
    dp = jnp.einsum("bhgqd,bhkd->bhgqk", do, vt, preferred_element_type=jnp.float32)
    # sum_k P dP == sum_d dO * O: a reduction over d instead of over the keys.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    # Masked scores are constants: no gradient, even in rows that are entirely masked.
    row_scale = inv * jnp.float32(scale)
    ds = jnp.where(mask[:, :, None, :, :], e * ((dp - delta) * row_scale), 0.0)
    ds = ds.astype(qg.dtype)
    dq = jnp.einsum("bhgqk,bhkd->bhgqd", ds, kt)
    dk = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qg)
    return (_from_groups(dq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3), None)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    return _attention_fwd(q, k, v, mask, scale)[0]


_attention.defvjp(lambda q, k, v, mask, scale: _attention_fwd(q, k, v, mask, scale),
                  _attention_bwd)
