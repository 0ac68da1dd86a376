"""Small building blocks shared by the encoders and decoders.

Every parameter carries logical axis names (see `mllm_jax.sharding.LOGICAL_RULES`); the leaf
names follow Flax (`kernel`, `bias`, `scale`, `embedding`) so that conversion to HF names is a
fixed rule (`kernel` -> transposed `weight`, and so on).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax import sharding

Dtype = Any


def dtype_of(name) -> jnp.dtype:
    return jnp.dtype(name) if name is not None else None


def with_axes(init, axes: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(axes))


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() is exact
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class Dense(nn.Module):
    """`y = x @ kernel + bias`, kernel stored [in, out] (the transpose of torch's Linear)."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", with_axes(self.kernel_init, self.axes), (x.shape[-1], self.features),
            self.param_dtype)
        # As a 2-D matmul: XLA:CPU handles the weight gradient of a [tokens, in] x [in, out]
        # product far better than the same contraction over (batch, seq) dims.
        lead = x.shape[:-1]
        y = sharding.matmul(x.reshape(-1, x.shape[-1]).astype(self.dtype),
                            kernel.astype(self.dtype), self.axes)
        y = y.reshape(*lead, self.features)
        if self.use_bias:
            bias = self.param("bias", with_axes(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm with torch's semantics: eps must come from the config (CLIP uses 1e-5)."""

    eps: float
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, (self.axis_name,)), (d,),
                           self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, (self.axis_name,)), (d,),
                          self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalized in float32, cast back, then scaled (HF's order of operations)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", with_axes(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                           self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02

    def setup(self):
        self.embedding = self.param(
            "embedding", with_axes(nn.initializers.normal(self.init_std), self.axes),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        """Logits against the embedding matrix (tied output head)."""
        return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


def plain_dict(value):
    """A config value (ConfigDict, dict or None) as a plain dict (or None)."""
    if value is None:
        return None
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)
