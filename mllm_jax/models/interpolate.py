"""Bicubic resizing that matches PyTorch, for position-embedding interpolation.

``jax.image.resize(method="bicubic")`` uses Keys' kernel with A = -0.5 and
renormalises weights at the borders, whereas PyTorch uses A = -0.75 and clamps
out-of-range taps onto the edge pixel. Checkpoints converted from PyTorch
(CLIP-style vision towers) expect PyTorch's numbers, so the 1-D weights are
built here explicitly and applied as two matmuls.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's cubic-convolution constant (aten/src/ATen/native/UpSample.h).
_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t, shape [4, n]."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix equal to PyTorch's 1-D bicubic resize.

    Matches ``F.interpolate(..., size=..., mode="bicubic", align_corners=False)``
    without antialias.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    # With size= PyTorch derives the scale as in/out, not from a user scale_factor.
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    # Unlike the linear modes, cubic does not clamp src to >= 0, so the first
    # outputs of an upsample get a negative fractional offset from index -1.
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - base)  # [4, out]
    taps = np.clip(base[None, :] + np.arange(-1, 3)[:, None], 0, in_size - 1)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_size)[None, :], taps.shape)
    # Clamped taps land on the same edge column, so their weights must add up.
    np.add.at(mat, (rows, taps), weights)
    return mat


def resize_bicubic_2d(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
    """Resize [..., H, W, C] to [..., out_h, out_w, C] like PyTorch bicubic."""
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    in_h, in_w = x.shape[-3], x.shape[-2]
    mh = jnp.asarray(bicubic_resize_matrix(in_h, out_h), dtype=x.dtype)
    mw = jnp.asarray(bicubic_resize_matrix(in_w, out_w), dtype=x.dtype)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,...hwc->...owc", mh, x, precision=hi)
    return jnp.einsum("pw,...hwc->...hpc", mw, y, precision=hi)


def interpolate_position_embedding(
    pos_embed: jax.Array,
    grid_hw: Sequence[int],
    new_grid_hw: Sequence[int],
    num_prefix_tokens: int = 1,
) -> jax.Array:
    """Resize the grid part of a [num_prefix + gh*gw, D] position table.

    Mirrors HF ``CLIPVisionEmbeddings.interpolate_pos_encoding``, which calls
    ``interpolate(size=(height // patch, width // patch), mode="bicubic")``;
    pass that target grid as ``new_grid_hw``. Prefix rows (class token) are kept.
    """
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    nh, nw = int(new_grid_hw[0]), int(new_grid_hw[1])
    if pos_embed.shape[0] != num_prefix_tokens + gh * gw:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[0]} rows, expected "
            f"{num_prefix_tokens} + {gh}*{gw}"
        )
    if (gh, gw) == (nh, nw):
        return pos_embed
    prefix = pos_embed[:num_prefix_tokens]
    grid = pos_embed[num_prefix_tokens:].reshape(gh, gw, -1)
    grid = resize_bicubic_2d(grid, (nh, nw)).reshape(nh * nw, -1)
    return jnp.concatenate([prefix, grid], axis=0)
