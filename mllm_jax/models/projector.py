"""Connectors from vision features to the LLM's embedding space (LLaVA's projectors)."""
from typing import Any

import flax.linen as nn

from mllm_jax.models.layers import Dense, activation

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


class MLPProjector(nn.Module):
    """`linear`: one Linear. `mlp2x_gelu`: Linear -> exact GELU -> Linear (HF
    `LlavaMultiModalProjector`, keys `linear_1`, `linear_2`)."""

    cfg: Any  # projector config
    out_features: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=c.bias)
        if c.type == "linear":
            return Dense(self.out_features, ("vision_embed", "embed"), name="linear_1", **kw)(x)
        if c.type == "mlp2x_gelu":
            h = Dense(self.out_features, ("vision_embed", "mlp"), name="linear_1", **kw)(x)
            h = activation(c.hidden_act)(h)
            return Dense(self.out_features, ("mlp", "embed"), name="linear_2", **kw)(h)
        raise ValueError(f"unknown projector type {c.type!r}; known: {PROJECTOR_TYPES}")
