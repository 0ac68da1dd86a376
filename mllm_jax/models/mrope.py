"""Qwen2-VL's multimodal RoPE positions (HF `Qwen2VLModel.get_rope_index`), traced with
static shapes: `position_ids` [3, batch, seq] (temporal, height, width) and the per-sample
`rope_deltas` by which decoding continues.

Text tokens count up by one in all three rows. An image (a run of image tokens, images
taken in the order of the flattened batch) starting at position p puts its merged token
(t, h, w) at (p + t, p + h, p + w), and the text after it continues from p + max(grid h,
grid w). Padding (attention mask 0) is skipped and gets position 0. `rope_deltas` is the
largest position + 1 minus the number of real tokens: generated token i of a sample (0 for
the first) sits at (real prompt tokens + i) + delta in all three rows.
"""
import jax
import jax.numpy as jnp


def rope_index(input_ids, image_grid_thw, attention_mask, image_token_id: int, merge: int):
    """([3, b, s] int32 positions, [b] int32 deltas). `image_grid_thw` [n_images, 3] (patch
    grids, before merging) may be traced, or None (text only)."""
    b, s = input_ids.shape
    mask = (jnp.ones((b, s), bool) if attention_mask is None
            else jnp.asarray(attention_mask) != 0)
    real = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # index among the real tokens
    if image_grid_thw is None:
        pos = jnp.where(mask, real, 0)
        return jnp.broadcast_to(pos[None], (3, b, s)), jnp.zeros((b,), jnp.int32)
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    is_image = (jnp.asarray(input_ids) == image_token_id) & mask
    # Whether the previous real token is an image token: a run of image tokens is one image.
    col = jnp.arange(s, dtype=jnp.int32)
    last_real = jax.lax.cummax(jnp.where(mask, col[None], -1), axis=1)
    prev = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
    prev_image = jnp.take_along_axis(is_image, jnp.maximum(prev, 0), axis=1) & (prev >= 0)
    start = is_image & ~prev_image
    image = jnp.clip(jnp.cumsum(start.reshape(-1)).reshape(b, s) - 1, 0, grid.shape[0] - 1)
    gt = grid[image, 0]
    gh = grid[image, 1] // merge
    gw = grid[image, 2] // merge
    delta = jnp.maximum(gh, gw) - gt * gh * gw  # positions spanned minus tokens held
    run_delta = jnp.cumsum(jnp.where(start, delta, 0), axis=1)  # images started so far
    first = jax.lax.cummax(jnp.where(start, real, -1), axis=1)  # the image's first token
    base = first + run_delta - delta
    k = real - first
    area = jnp.maximum(gh * gw, 1)
    t_idx, hw = k // area, k % area
    h_idx, w_idx = hw // jnp.maximum(gw, 1), hw % jnp.maximum(gw, 1)
    image_pos = jnp.stack([base + t_idx, base + h_idx, base + w_idx])
    text_pos = jnp.broadcast_to((real + run_delta)[None], (3, b, s))
    pos = jnp.where(is_image[None], image_pos, text_pos)
    pos = jnp.where(mask[None], pos, 0).astype(jnp.int32)
    largest = jnp.max(jnp.where(mask[None], pos, -1), axis=(0, 2))
    deltas = largest + 1 - jnp.sum(mask, axis=1, dtype=jnp.int32)
    return pos, deltas.astype(jnp.int32)
