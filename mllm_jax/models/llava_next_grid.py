"""LLaVA-NeXT's feature layout, as integer arithmetic that runs on the host (numpy) and under
`jax.jit` (jax.numpy) alike, with HF's results.

An image of size (h, w) is preprocessed onto the best pinpoint (`select_best_resolution`), cut
into tiles of the tower's resolution, plus a base view of the whole image. Its features are
the base view's tokens, then the tiles' tokens laid out as one grid (rows of tiles, each tile
`grid` x `grid` patches), unpadded to the image's aspect ratio (HF's `unpad_image`) and read
row by row, each row followed by the learned `image_newline`.

HF computes two steps in Python floats, and both are reproduced exactly here:
- `select_best_resolution` computes `int(w * min(pw / w, ph / h))`: a double division, a
  double product, then truncation. Where the exact product is an integer N, the rounded
  quotient can make it N - 1 (1 in 6 (h, w) pairs of 1..1500 for a dimension, 36 of those
  2.25M pairs for the chosen pinpoint on LLaVA-NeXT's pinpoints). `_f64_floor_mul_div`
  follows IEEE double rounding with integers: the quotient's rounding from a long division,
  then whether the product rounds back up to N.
- `unpad_image` computes `int(round(oh * (cw / ow), 7))`, which is floor(oh * cw / ow) for
  every image side below 2e7: a non-integer quotient is at least 1 / ow from an integer.

Bounds: image sides below 2**15 and pinpoint sides below 2**13 (`MAX_IMAGE_SIDE`,
`MAX_PINPOINT_SIDE`; checked on the host, and kept int32-exact on the device).
"""
from __future__ import annotations

import math

import numpy as np

MAX_IMAGE_SIDE = 2 ** 15 - 1
MAX_PINPOINT_SIDE = 2 ** 13
# Quotient bits a long division produces: 53 significant bits after up to 16 leading zeros.
_DIVISION_STEPS = 53 + 16


def _xp(x):
    return np if isinstance(x, (np.ndarray, np.generic, int)) else _jnp()


def _jnp():
    import jax.numpy as jnp
    return jnp


def _bit_length(x, xp):
    """floor(log2 x) + 1 of positive int32 values (0 for 0)."""
    if xp is np:
        return np.frexp(np.asarray(x, np.float64))[1].astype(np.int32)
    from jax import lax
    return (32 - lax.clz(x.astype(np.int32))).astype(np.int32)


def _f64_division(a, b, xp):
    """The IEEE double a / b of positive ints (a / b < 2**53, b < 2**16): (F, rem, down)
    with 2**F <= a / b < 2**(F + 1), the remainder `rem` of the 53-bit quotient's long
    division (0: a / b is exact) and whether the double is below a / b (rounded down)."""
    ip, r = a // b, a % b
    ip_bits = _bit_length(ip, xp)
    # Fractional bits still needed for 53 significant bits; when ip == 0 the leading zero
    # fraction bits are skipped (counted in `zeros`) before any are taken.
    needed = xp.where(ip > 0, 53 - ip_bits, 53)
    zero = xp.zeros_like(a)

    def step(_, state):
        r, taken, zeros, last = state
        active = taken < needed
        r2 = 2 * r
        bit = (r2 >= b).astype(a.dtype)
        leading = (ip == 0) & (taken == 0) & (bit == 0) & active
        take = active & ~leading
        return (xp.where(active, r2 - bit * b, r), taken + take.astype(a.dtype),
                zeros + leading.astype(a.dtype), xp.where(take, bit, last))

    state = (r, zero, zero, ip % 2)  # `last`: the quotient's last bit, for ties to even
    if xp is np:
        for i in range(_DIVISION_STEPS):
            state = step(i, state)
    else:
        from jax import lax
        state = lax.fori_loop(0, _DIVISION_STEPS, step, state)
    r, _, zeros, last = state
    exponent = xp.where(ip > 0, ip_bits - 1, -(zeros + 1))
    down = (2 * r < b) | ((2 * r == b) & (last == 0))
    return exponent, r, down & (r > 0)


def _f64_floor_mul_div(x, a, b, division, xp):
    """Python's `int(x * (a / b))` for positive ints (x, b <= MAX_IMAGE_SIDE, a <=
    MAX_PINPOINT_SIDE), `division` being `_f64_division(a, b)`: floor(x * a / b), less one
    where the exact product N is an integer and the double quotient, rounded down, makes the
    double product round below N."""
    num = x * a
    exact = num // b
    integer = (num % b) == 0
    f, rem, down = division
    e = _bit_length(exact, xp) - 1
    power_of_two = (exact & (exact - 1)) == 0
    # x * q = N - x * rem / (b * 2**(52 - F)); the double below N is 2**(E - 52) away
    # (2**(E - 53) when N is a power of two). It rounds below N past half that distance:
    # x * rem * 2**t > b, t = 1 + F - E (+1 at a power of two); ties go to N (even).
    t = 1 + f - e + power_of_two.astype(f.dtype)
    t_pos = xp.minimum(xp.maximum(t, 0), 4)
    t_neg = xp.minimum(xp.maximum(-t, 0), 16)
    above = xp.where(t >= 0, rem > b // (x * (2 ** t_pos)), x * rem > b * (2 ** t_neg))
    return exact - (integer & down & above).astype(exact.dtype)


def select_best_pinpoint(heights, widths, pinpoints):
    """Index into `pinpoints` ((height, width) pairs) of the best resolution for images of
    the given sizes (int arrays [n]), as `data.image.select_best_resolution` (HF's, in
    doubles): the most image pixels kept, then the fewest wasted; the first of equals."""
    xp = _xp(heights)
    h = xp.asarray(heights).astype(np.int32)[None, :]
    w = xp.asarray(widths).astype(np.int32)[None, :]
    table = np.asarray(pinpoints, np.int32)
    ph = xp.broadcast_to(xp.asarray(table[:, :1]), (len(table), h.shape[1]))
    pw = xp.broadcast_to(xp.asarray(table[:, 1:]), ph.shape)
    h, w = xp.broadcast_to(h, ph.shape), xp.broadcast_to(w, ph.shape)
    # Both quotients in one long division: [2, pinpoints, n].
    f, rem, down = _f64_division(xp.stack([pw, ph]), xp.stack([w, h]), xp)
    by_width = pw * h <= ph * w  # min(pw / w, ph / h) is pw / w
    q_w, q_h = (f[0], rem[0], down[0]), (f[1], rem[1], down[1])
    dw = xp.where(by_width, _f64_floor_mul_div(w, pw, w, q_w, xp),
                  _f64_floor_mul_div(w, ph, h, q_h, xp))
    dh = xp.where(by_width, _f64_floor_mul_div(h, pw, w, q_w, xp),
                  _f64_floor_mul_div(h, ph, h, q_h, xp))
    effective = xp.minimum(dw * dh, h * w)
    wasted = ph * pw - effective
    best = xp.zeros_like(h[0])
    best_effective, best_wasted = xp.full_like(h[0], -1), xp.full_like(h[0], 2 ** 30)
    for i in range(len(table)):
        better = (effective[i] > best_effective) | ((effective[i] == best_effective)
                                                    & (wasted[i] < best_wasted))
        best = xp.where(better, i, best)
        best_effective = xp.where(better, effective[i], best_effective)
        best_wasted = xp.where(better, wasted[i], best_wasted)
    return best


def layout(image_sizes, pinpoints, tile: int, grid: int):
    """Per image, the unpadded feature grid: a dict of int32 arrays [n] — `tiles_h`,
    `tiles_w` (the pinpoint's tiles), `top`, `left` (the first kept grid row and column),
    `rows`, `cols` (kept) — for `image_sizes` [n, 2] (height, width); `tile`: the tower's
    resolution, `grid`: its patches per side."""
    xp = _xp(image_sizes)
    sizes = xp.asarray(image_sizes).astype(np.int32)
    oh, ow = sizes[:, 0], sizes[:, 1]
    index = select_best_pinpoint(oh, ow, pinpoints)
    table = np.asarray(pinpoints, np.int32) // tile
    tiles_h = xp.asarray(table[:, 0])[index]
    tiles_w = xp.asarray(table[:, 1])[index]
    ch, cw = tiles_h * grid, tiles_w * grid
    wider = ow * ch > cw * oh  # the image is wider than the grid: rows are cut
    new_h = (oh * cw) // ow
    new_w = (ow * ch) // oh
    pad_h = xp.where(wider, (ch - new_h) // 2, 0)
    pad_w = xp.where(wider, 0, (cw - new_w) // 2)
    return {"tiles_h": tiles_h, "tiles_w": tiles_w, "top": pad_h, "left": pad_w,
            "rows": ch - 2 * pad_h, "cols": cw - 2 * pad_w}


def feature_lengths(lay, base_tokens: int):
    """Features per image: the base view's tokens, then each kept row and its newline."""
    return base_tokens + lay["rows"] * (lay["cols"] + 1)


def max_tiles(pinpoints, tile: int) -> int:
    """The most views an image can have: the base view and the largest pinpoint's tiles."""
    return 1 + max(math.ceil(ph / tile) * math.ceil(pw / tile) for ph, pw in pinpoints)


def max_features(pinpoints, tile: int, grid: int, base_tokens: int) -> int:
    """The most features an image can have (nothing unpadded)."""
    return base_tokens + max((ph // tile) * grid * ((pw // tile) * grid + 1)
                             for ph, pw in pinpoints)


def gather_plan(lay, base_tokens: int, grid: int, length: int):
    """Where each of an image's `length` output positions reads from: (view [n, length]:
    0 the base view, 1.. the tiles; token [n, length] within the view; newline [n, length]
    bool; valid [n, length] bool, False past the image's features)."""
    xp = _xp(lay["rows"])
    k = xp.arange(length, dtype=np.int32)[None, :]
    cols = lay["cols"][:, None]
    j = xp.maximum(k - base_tokens, 0)
    row, col = j // (cols + 1), j % (cols + 1)
    newline = (k >= base_tokens) & (col == cols)
    gr, gc = row + lay["top"][:, None], xp.minimum(col, cols - 1) + lay["left"][:, None]
    gc = xp.maximum(gc, 0)
    view = xp.where(k < base_tokens, 0,
                    1 + (gr // grid) * lay["tiles_w"][:, None] + gc // grid)
    token = xp.where(k < base_tokens, k, (gr % grid) * grid + gc % grid)
    valid = k < feature_lengths(lay, base_tokens)[:, None]
    view = xp.where(valid & ~newline, view, 0)
    token = xp.where(valid & ~newline, token, 0)
    return view, token, newline, valid
