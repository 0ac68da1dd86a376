"""Projection connectors (LLaVA's projectors): `linear` (one Linear) and `mlp2x_gelu`
(Linear -> exact GELU -> Linear, HF `LlavaMultiModalProjector`, keys `linear_1`, `linear_2`).
One output token per input token."""
from typing import Any

import flax.linen as nn

from mllm_jax import config as mc
from mllm_jax.models.layers import Dense, activation, dtype_of
from mllm_jax.models.registry import ConnectorSpec, register_connector


def _dense_kw(cfg):
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                use_bias=cfg.projector.bias)


class LinearProjector(nn.Module):
    cfg: Any  # composed model config: `projector`, `text.hidden_size`

    @nn.compact
    def __call__(self, x):
        d = self.cfg.text.hidden_size
        return Dense(d, ("vision_embed", "embed"), name="linear_1", **_dense_kw(self.cfg))(x)


class MLPProjector(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, _dense_kw(self.cfg)
        d = c.text.hidden_size
        h = Dense(d, ("vision_embed", "mlp"), name="linear_1", **kw)(x)
        h = activation(c.projector.hidden_act)(h)
        return Dense(d, ("mlp", "embed"), name="linear_2", **kw)(h)


def _flops(layers):
    def count(cfg, tokens_in, d_in):
        d = cfg.text.hidden_size
        return 2 * tokens_in * d_in * d + (layers - 1) * 2 * tokens_in * d * d
    return count


register_connector("linear", ConnectorSpec(
    module=LinearProjector, config=lambda **kw: mc.projector_config(type="linear", **kw),
    flops=_flops(1)))
register_connector("mlp2x_gelu", ConnectorSpec(
    module=MLPProjector, config=lambda **kw: mc.projector_config(type="mlp2x_gelu", **kw),
    flops=_flops(2)))
