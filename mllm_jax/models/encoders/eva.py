"""BLIP-2's EVA ViT-g as an MLLM's encoder (`vision.type = "eva"`): HF `Blip2VisionModel`
(and `InstructBlipVisionModel`, the same tower), as a configuration of the ViT in
`models/vit.py`: one fused `qkv` projection with HF's [3d] bias (q and v trained, k stored
as zeros by the published checkpoints), the attention output named `projection`, a patch
conv with bias, class / position embeddings as plain [1, 1, d] / [1, n+1, d] parameters, no
pre LayerNorm, and the post LayerNorm on every output token.

The tower's parameters sit at its own root (`embeddings/...`, `encoder/layers_{i}/...`,
`post_layernorm/...`), as in HF's vision model, so a composed model that names it
`vision_model` reads BLIP-2's `vision_model.*` keys, and one that names it `vision_tower`
reads `vision_tower.*`.

Features: the post-LayerNormed last hidden state, every token including CLS (what BLIP-2's
Q-Former reads). A composed config with LLaVA's `vision_feature_layer` gets LLaVA's
selection instead (that layer's output, CLS dropped unless the strategy is `full`, no post
LayerNorm), as with the `clip` encoder.
"""
from typing import Any

import flax.linen as nn

from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models.encoders.clip import check_vision as check_vit_sizes
from mllm_jax.models.encoders.clip import feature_layers, keeps_cls
from mllm_jax.models.layers import ACTIVATIONS, dtype_of
from mllm_jax.models.registry import EncoderSpec, UnsupportedModelError, register_encoder
from mllm_jax.models.vit import (VisionTransformer, select_features, selects_layers,
                                 vision_fields_from_hf)

# transformers' Blip2VisionConfig defaults (InstructBlipVisionConfig's are the same); HF
# writes only the fields that differ from them. The patch conv always takes 3 channels.
VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                       num_attention_heads=16, image_size=224, patch_size=14,
                       hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
HF_MODEL_TYPES = ("blip_2_vision_model", "instructblip_vision_model")

# The settings of the shared ViT that make it BLIP's EVA tower.
EVA_LAYOUT = dict(use_class_token=True, fused_qkv=True, attn_out_name="projection",
                  patch_bias=True, embeddings_as_parameters=True, pre_layernorm=False,
                  post_layernorm=True, post_layernorm_tokens=True, num_channels=3)


def eva_vision_config(**overrides):
    """The EVA ViT-g/14 of BLIP-2 at 224 px (transformers' Blip2VisionConfig defaults)."""
    c = mc.vision_config(type="eva", **VISION_DEFAULTS, **EVA_LAYOUT)
    c.update(overrides)
    return c


class EvaVisionTower(nn.Module):
    """NHWC pixels [n, h, w, 3] -> features [n, tokens, d] (see the module docstring)."""

    cfg: Any  # composed model config; the tower's own fields under `vision`

    def setup(self):
        c = self.cfg
        self.vit = VisionTransformer(c.vision, dtype_of(c.dtype), dtype_of(c.param_dtype),
                                     c.scan_layers, c.remat_policy)
        nn.share_scope(self, self.vit)  # HF's vision model has no wrapper level

    def __call__(self, pixel_values):
        out = self.vit(pixel_values)
        if not selects_layers(self.cfg):
            return out["last_hidden_state"]
        layers = feature_layers(self.cfg)
        return select_features(out["hidden_states"], layers[0] if len(layers) == 1 else layers,
                               keep_cls=keeps_cls(self.cfg), has_cls=True)


def tokens_per_image(cfg, image_size=None) -> int:
    """Patches of an image (`image_size` (h, w); default: the configured square) plus CLS
    (dropped under LLaVA's `default` strategy)."""
    v = cfg.vision
    h, w = image_size if image_size is not None else (v.image_size, v.image_size)
    grid = (h // v.patch_size) * (w // v.patch_size)
    return grid + (0 if selects_layers(cfg) and not keeps_cls(cfg) else 1)


def layers_run(cfg) -> int:
    n = cfg.vision.num_hidden_layers
    if not selects_layers(cfg):
        return n
    return max(layer % (n + 1) for layer in feature_layers(cfg))


def forward_flops(cfg) -> float:
    """Matmul FLOPs of one image at the configured size through the layers the features
    need (2 per multiply-add; LayerNorms, softmax and GELU not counted)."""
    v = cfg.vision
    grid = (v.image_size // v.patch_size) ** 2
    t = grid + 1
    d, f = v.hidden_size, v.intermediate_size
    patch = 2 * grid * v.patch_size ** 2 * v.num_channels * d
    per_layer = 2 * t * 4 * d * d + 2 * t * 2 * d * f + 2 * 2 * t * t * d
    return patch + layers_run(cfg) * per_layer


def feature_size(cfg) -> int:
    layers = feature_layers(cfg) if selects_layers(cfg) else [-1]
    return cfg.vision.hidden_size * len(layers)


def check_vision(v, where: str = "vision config") -> None:
    """The tower's constraints on a vision config (or a dict of its fields)."""
    check_vit_sizes(v, where)
    checks.one_of(v, "hidden_act", where, sorted(ACTIVATIONS))
    checks.one_of(v, "qkv_bias", where, (True, False))


def vision_from_hf(hf: dict, where: str = "config.json", defaults=None):
    """Our vision config from HF's `Blip2VisionConfig` / `InstructBlipVisionConfig` dict
    (a composed config's `vision_config`); absent fields take transformers' defaults."""
    d, where = vision_fields_from_hf(hf, where, VISION_DEFAULTS, HF_MODEL_TYPES,
                                     overrides=defaults, tower="an EVA ViT")
    check_vision({**d, "num_channels": 3}, where)  # before anything is built from them
    return eva_vision_config(**d)


def vision_to_hf(v, model_type: str = HF_MODEL_TYPES[0]) -> dict:
    """HF's vision_config dict for our config (`model_type`: blip_2_vision_model or
    instructblip_vision_model)."""
    wrong = [f"{k} = {v.get(k)!r} (needs {want!r})" for k, want in EVA_LAYOUT.items()
             if v.get(k) != want]
    if wrong:
        raise UnsupportedModelError(
            "only BLIP's EVA layout can be written as an HF Blip2VisionModel; the vision "
            f"config has {'; '.join(wrong)}")
    if model_type not in HF_MODEL_TYPES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not one of "
                                    f"{', '.join(HF_MODEL_TYPES)}")
    return {"model_type": model_type, **{k: v[k] for k in VISION_DEFAULTS}}


register_encoder("eva", EncoderSpec(
    module=EvaVisionTower, config=eva_vision_config, tokens_per_image=tokens_per_image,
    flops=forward_flops, feature_size=feature_size, from_hf=vision_from_hf, to_hf=vision_to_hf,
    check=check_vision))
