"""Masks and dot-product attention (float32 softmax, grouped-query heads)."""
import jax
import jax.numpy as jnp


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


def dot_product_attention(q, k, v, mask, scale: float):
    """q: [b, q, h, d]; k, v: [b, kv, kv_heads, d]; mask broadcastable to [b, 1, q, kv].

    Query heads are grouped over the key/value heads (GQA) without copying k and v.
    Rows with no allowed key (padding queries) get uniform weights instead of NaN, as
    HF's eager attention does with its finite minimum.
    """
    b, q_len, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    qg = q.reshape(b, q_len, kv_heads, groups, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(scale)
    big_neg = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask[:, :, None, :, :], scores, big_neg)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, q_len, h, d)
