"""Rotary position embeddings in the HF rotate-half layout (weights stay as HF stores them)."""
import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, rope_scaling=None) -> np.ndarray:
    """HF's `inv_freq` for the given rope type, in float32 (as HF computes it)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(rope_scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = rope_scaling["factor"]
        low = rope_scaling["low_freq_factor"]
        high = rope_scaling["high_freq_factor"]
        old_len = rope_scaling["original_max_position_embeddings"]
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")


def rope_cos_sin(position_ids, inv_freq, dtype):
    """cos/sin tables [batch, seq, head_dim] for integer positions [batch, seq]."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def mrope_cos_sin(position_ids, inv_freq, mrope_section, dtype):
    """Multimodal RoPE (Qwen2-VL): positions [3, batch, seq] (temporal, height, width); the
    rotary frequencies are split into `mrope_section` chunks (summing to head_dim // 2) and
    chunk i takes its angles from position row i % 3. cos/sin: [batch, seq, head_dim]."""
    freqs = (position_ids.astype(jnp.float32)[..., None]
             * jnp.asarray(inv_freq)[None, None, None, :])  # [3, b, s, head_dim // 2]
    bounds = np.cumsum([0] + list(mrope_section))
    if bounds[-1] != freqs.shape[-1]:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim // 2 = "
                         f"{freqs.shape[-1]}")
    freqs = jnp.concatenate([freqs[i % 3, ..., int(bounds[i]):int(bounds[i + 1])]
                             for i in range(len(mrope_section))], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
