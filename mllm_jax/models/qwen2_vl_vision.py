"""Qwen2-VL's native-resolution ViT (HF `Qwen2VisionTransformerPretrainedModel`).

Input: HF's flattened patches `pixel_values` [total_patches, C * T * P * P] (the image
processor's output, images concatenated, each image's patches in merge-window order) and
`grid_thw` [n_images, 3] (temporal, height, width patches per image). Output: the merged
tokens [total_patches / merge**2, LLM width], image after image.

Shapes are static: the patch axis may be longer than the images' patches (a bucket, see
`pad_patches`; training batches carry each row's images in their own row, `pad_rows`,
which `flatten_rows` turns into this layout inside the program); rows past sum(t * h * w)
are padding, kept out of every image's attention and out of the merged tokens the images
own. Everything that depends on the grid (2D RoPE positions, the per-frame attention
segments HF builds from `cu_seqlens`) is computed from `grid_thw` inside the program, so
one compiled program serves every image size whose patches fit its bucket.

Qwen2.5-VL's tower (`Qwen2_5_VisionTransformerPretrainedModel`) is a configuration of the
same one: RMSNorms (`norm = "rmsnorm"`), a gated MLP with biases (`mlp = "gated"`:
gate_proj, up_proj, down_proj) and window attention: blocks outside
`fullatt_block_indexes` attend within windows of window_size / patch_size / merge merged
tokens a side. HF reorders the patches window by window and back; attention, per-token
layers and the merge (whose 2x2 units the reordering keeps whole) do not depend on the
order, so here the windows are an attention mask over the original order.

Paths mirror HF's on-disk names: `visual/patch_embed/proj/weight` (the Conv3d weight as
torch stores it, [embed, C, T, P, P]), `visual/blocks_{i}/{norm1, norm2, attn/qkv,
attn/proj, mlp/fc1, mlp/fc2}` (Qwen2.5: `mlp/{gate_proj, up_proj, down_proj}`),
`visual/merger/{ln_q, mlp/0, mlp/2}`.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models import attention
from mllm_jax.models.layers import Dense, LayerNorm, RMSNorm, activation, with_axes
from mllm_jax.models.rope import rotate_half

ACT_AXES = ("activation_length", "activation_embed")


def vision_positions(grid_thw, num_patches: int, merge: int):
    """Per patch row: (h, w) grid coordinates in HF's merge-window order, the attention
    segment (one per frame of each image; padding rows: -1) -> ([n, 2] int32, [n] int32).
    `grid_thw` may be traced; `num_patches` is the static row count."""
    grid = jnp.asarray(grid_thw, jnp.int32).reshape(-1, 3)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    per_image = t * h * w
    ends = jnp.cumsum(per_image)
    starts = ends - per_image
    row = jnp.arange(num_patches, dtype=jnp.int32)
    image = jnp.clip(jnp.searchsorted(ends, row, side="right"), 0, grid.shape[0] - 1)
    valid = row < ends[-1]
    local = row - starts[image]
    hw = jnp.maximum(h[image] * w[image], 1)
    frame, within = local // hw, local % hw
    blocks_w = jnp.maximum(w[image] // merge, 1)
    block, cell = within // (merge * merge), within % (merge * merge)
    hpos = (block // blocks_w) * merge + cell // merge
    wpos = (block % blocks_w) * merge + cell % merge
    frames_before = jnp.cumsum(t) - t
    segment = jnp.where(valid, frames_before[image] + frame, -1)
    return jnp.stack([hpos, wpos], axis=-1), segment


def vision_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """HF's axial `inv_freq`: head_dim // 4 frequencies, shared by the h and w halves."""
    spatial = head_dim // 2
    return (1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32)
                             / spatial))).astype(np.float32)


def vision_cos_sin(positions, inv_freq):
    """[n, 2] (h, w) positions -> float32 cos/sin [n, head_dim]: (h, w, h, w) angle blocks."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [n, 2, k]
    hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    emb = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def patch_bucket(total: int, cfg_vision) -> int:
    """The static patch count `total` patches are padded to: the smallest of
    `vision.patch_buckets` that holds them, else the next power of two (at least 4
    merge windows)."""
    for size in sorted(cfg_vision.get("patch_buckets") or ()):
        if size >= total:
            return int(size)
    unit = cfg_vision.spatial_merge_size ** 2
    return max(4 * unit, 1 << max(int(total) - 1, 0).bit_length())


def pad_patches(pixel_values, grid_thw, cfg_vision):
    """Concrete HF patches [total, D] and grids [n, 3] padded to static sizes that depend
    on the patch bucket alone: the patches with zero rows to `patch_bucket(total)` (rows
    past the grids' patches are padding), the grids with (0, 0, 0) rows (images without
    patches) to bucket / merge**2 rows, the most images a bucket can hold.
    -> (patches, grids)."""
    pixel_values = np.asarray(pixel_values)
    grid = np.asarray(grid_thw).reshape(-1, 3)
    total = int(np.prod(grid, axis=-1).sum())
    if total != pixel_values.shape[0]:
        raise ValueError(f"pixel_values hold {pixel_values.shape[0]} patches but image_grid_thw "
                         f"{grid.tolist()} gives {total}")
    size = patch_bucket(total, cfg_vision)
    pad = np.zeros((size - total, pixel_values.shape[1]), pixel_values.dtype)
    images = max(size // cfg_vision.spatial_merge_size ** 2, len(grid))
    grid = np.concatenate([grid, np.zeros((images - len(grid), 3), grid.dtype)])
    return np.concatenate([pixel_values, pad], axis=0), grid


def pad_rows(rows, cfg_vision):
    """A batch's images row by row, the layout training batches carry (its leading axis is
    the batch's, so rows shard over data-parallel devices with their images): `rows` holds
    per batch row a list of (patches [n, D], grid (t, h, w)) -> (pixel_values [B, P, D]:
    each row's patches, image after image, then zero rows; image_grid_thw [B, P / merge**2,
    3]: each row's grids, then (0, 0, 0) rows). P is the patch bucket of the fullest row,
    so batches whose rows fit one bucket have one shape."""
    grids = [np.asarray([g for _, g in row], np.int64).reshape(-1, 3) for row in rows]
    totals = [int(np.prod(g, axis=-1).sum()) for g in grids]
    dim = cfg_vision.in_channels * cfg_vision.temporal_patch_size * cfg_vision.patch_size ** 2
    size = patch_bucket(max(totals, default=0), cfg_vision)
    images = max([size // cfg_vision.spatial_merge_size ** 2] + [len(g) for g in grids])
    pixel_values = np.zeros((len(rows), size, dim), np.float32)
    image_grid_thw = np.zeros((len(rows), images, 3), np.int64)
    for r, row in enumerate(rows):
        patches = [np.asarray(p, np.float32) for p, _ in row]
        for p, g in zip(patches, grids[r]):
            if p.shape != (int(np.prod(g)), dim):
                raise ValueError(f"patches of shape {p.shape} for grid {g.tolist()}; the "
                                 f"tower takes [t * h * w, {dim}]")
        if patches:
            pixel_values[r, :totals[r]] = np.concatenate(patches)
        image_grid_thw[r, :len(grids[r])] = grids[r]
    return pixel_values, image_grid_thw


def _compact(keep, order_index):
    """Destinations that move the kept entries first and the others after, each group in
    its original order: a permutation of 0..n-1."""
    keep = keep.reshape(-1)
    kept_before = jnp.cumsum(keep, dtype=jnp.int32) - keep
    others_before = order_index - kept_before
    return jnp.where(keep, kept_before, jnp.sum(keep, dtype=jnp.int32) + others_before)


def flatten_rows(pixel_values, image_grid_thw):
    """`pad_rows`' layout (pixel_values [B, P, D], image_grid_thw [B, K, 3]; traced or not)
    -> HF's flattened layout padded to a bucket, as `pad_patches` gives it: the real patches
    row after row [B * P, D] (padding rows last) and the real grids in the same order
    [B * K, 3] ((0, 0, 0) rows last). A permutation of the rows, inside the program."""
    b, p, d = pixel_values.shape
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(b, -1, 3)
    sizes = jnp.prod(grid, axis=-1)
    counts = jnp.sum(sizes, axis=-1)
    real = jnp.arange(p, dtype=jnp.int32)[None, :] < counts[:, None]
    dest = _compact(real, jnp.arange(b * p, dtype=jnp.int32))
    flat = jnp.zeros((b * p, d), pixel_values.dtype).at[dest].set(
        jnp.asarray(pixel_values).reshape(b * p, d), unique_indices=True)
    n = sizes.size
    grid_dest = _compact(sizes > 0, jnp.arange(n, dtype=jnp.int32))
    grids = jnp.zeros((n, 3), jnp.int32).at[grid_dest].set(grid.reshape(n, 3),
                                                            unique_indices=True)
    return flat, grids


class PatchEmbed(nn.Module):
    """HF's `PatchEmbed`: its Conv3d under `proj`."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, patches):
        return PatchConv(self.cfg, self.dtype, self.param_dtype, name="proj")(patches)


class PatchConv(nn.Module):
    """The stride = kernel Conv3d as one matmul over HF's flattened (C, T, P, P) patches;
    its weight kept in torch's [embed, C, T, P, P] layout."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, patches):
        c = self.cfg
        shape = (c.embed_dim, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        weight = self.param("weight", with_axes(nn.initializers.normal(0.02),
                                                ("embed", None, None, None, None)),
                            shape, self.param_dtype)
        flat = weight.astype(self.dtype).reshape(c.embed_dim, -1)
        if patches.shape[-1] != flat.shape[1]:
            raise ValueError(f"pixel_values rows must hold C*T*P*P = {flat.shape[1]} values "
                             f"(HF's flattened patches), got {patches.shape}")
        return jnp.dot(patches.astype(self.dtype), flat.T)


class VisionAttention(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        c = self.cfg
        n, d = x.shape
        nh = c.num_heads
        hd = d // nh
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Dense(3 * d, ("embed", "heads"), True, name="qkv", **kw)(x).reshape(n, 3, nh, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # RoPE in float32, cast back (HF's apply_rotary_pos_emb_vision).
        rot = lambda t: (t.astype(jnp.float32) * cos[:, None]  # noqa: E731
                         + rotate_half(t.astype(jnp.float32)) * sin[:, None]).astype(t.dtype)
        q, k = rot(q), rot(k)
        out = attention.dot_product_attention(q[None], k[None], v[None], mask,
                                              scale=hd ** -0.5)
        return Dense(d, ("heads", "embed"), True, name="proj", **kw)(out.reshape(n, d))


def _norm(c):
    return RMSNorm if c.get("norm", "layernorm") == "rmsnorm" else LayerNorm


class VisionBlock(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = _norm(c)
        mlp = GatedVisionMlp if c.get("mlp", "fc") == "gated" else VisionMlp
        x = x + VisionAttention(c, name="attn", **kw)(norm(1e-6, name="norm1", **kw)(x), mask,
                                                      cos, sin)
        x = x + mlp(c, name="mlp", **kw)(norm(1e-6, name="norm2", **kw)(x))
        return nn.with_logical_constraint(x, ACT_AXES)


class GatedVisionMlp(nn.Module):
    """Qwen2.5-VL's: down(act(gate(x)) * up(x)), with biases."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense(c.intermediate_size, ("embed", "mlp"), True, name="gate_proj", **kw)(x)
        up = Dense(c.intermediate_size, ("embed", "mlp"), True, name="up_proj", **kw)(x)
        h = activation(c.hidden_act)(gate) * up
        return Dense(c.embed_dim, ("mlp", "embed"), True, name="down_proj", **kw)(h)


class VisionMlp(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(c.embed_dim * c.mlp_ratio, ("embed", "mlp"), True, name="fc1", **kw)(x)
        h = activation(c.hidden_act)(h)
        return Dense(c.embed_dim, ("mlp", "embed"), True, name="fc2", **kw)(h)


class PatchMerger(nn.Module):
    """LayerNorm (eps 1e-6), then each merge window's patches concatenated and the MLP
    (Linear, exact GELU, Linear) to the LLM width. HF's Sequential indices name the
    Linears: `mlp/0`, `mlp/2`."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = c.embed_dim * c.spatial_merge_size ** 2
        x = _norm(c)(1e-6, name="ln_q", **kw)(x).reshape(-1, width)
        mlp = _Sequential(name="mlp")
        return mlp(x, width, c.hidden_size, kw)


class _Sequential(nn.Module):
    @nn.compact
    def __call__(self, x, width, out, kw):
        x = Dense(width, ("embed", "mlp"), True, name="0", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return Dense(out, ("mlp", "embed"), True, name="2", **kw)(x)


class Qwen2VisionTransformer(nn.Module):
    """HF patches [n, C*T*P*P] and grid_thw [images, 3] -> merged tokens [n / merge**2,
    LLM width]. `n` must be a multiple of merge**2 (a bucket from `patch_bucket` is)."""

    cfg: Any  # vision config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, grid_thw):
        c = self.cfg
        n = pixel_values.shape[0]
        unit = c.spatial_merge_size ** 2
        if n % unit:
            raise ValueError(f"the patch count {n} must be a multiple of spatial_merge_size**2 "
                             f"= {unit}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(c, name="patch_embed", **kw)(pixel_values)
        positions, segment = vision_positions(grid_thw, n, c.spatial_merge_size)
        cos, sin = vision_cos_sin(positions, vision_inv_freq(c.embed_dim // c.num_heads,
                                                             c.get("rope_theta", 10000.0)))
        # Block-diagonal attention: a patch sees the patches of its own frame; padding rows
        # (segment -1) see each other only.
        mask = (segment[:, None] == segment[None, :])[None, None]
        window_mask = mask
        if c.get("window_size"):
            side = c.spatial_merge_size * max(c.window_size // c.spatial_merge_size
                                              // c.patch_size, 1)
            wh, ww = positions[:, 0] // side, positions[:, 1] // side
            window_mask = mask & ((wh[:, None] == wh[None, :])
                                  & (ww[:, None] == ww[None, :]))[None, None]
        full = set(c.get("fullatt_block_indexes") or ())
        for i in range(c.depth):
            x = VisionBlock(c, name=f"blocks_{i}", **kw)(
                x, mask if i in full or not c.get("window_size") else window_mask, cos, sin)
        return PatchMerger(c, name="merger", **kw)(x)


def vision_forward_flops(v, num_patches: int) -> float:
    """Matmul FLOPs of the tower over `num_patches` patches attending as one segment (an
    upper bound for several images)."""
    d = v.embed_dim
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    mlp = (2 * num_patches * 3 * d * v.intermediate_size if v.get("mlp", "fc") == "gated"
           else 2 * num_patches * 2 * d * d * v.mlp_ratio)
    per_block = 2 * num_patches * d * 4 * d + mlp + 2 * 2 * num_patches * num_patches * d
    width = d * v.spatial_merge_size ** 2
    merged = num_patches // v.spatial_merge_size ** 2
    merger = 2 * merged * width * (width + v.hidden_size)
    return 2 * num_patches * patch_in * d + v.depth * per_block + merger


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """HF's Qwen2-VL `smart_resize`: sides rounded to multiples of `factor` with the pixel
    count brought within [min_pixels, max_pixels], the aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
