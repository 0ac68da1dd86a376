"""The CLIP ViT as an MLLM's encoder (`vision.type = "clip"`): LLaVA's feature selection
on top of the tower in `models/vit.py`, its HF `CLIPVisionConfig` mapping, tokens and FLOPs.

Paths stay HF's: `vision_tower/vision_model/...` under a composed model.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models.layers import dtype_of
from mllm_jax.models.registry import (EncoderSpec, ModelFamily, UnsupportedModelError,
                                      register_encoder, register_model)
from mllm_jax.models.vit import (VisionModel, VisionTransformer, select_features,
                                 vision_fields_from_hf)

# transformers' CLIPVisionConfig defaults: HF writes only the fields that differ from them.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)


def feature_layers(cfg) -> list:
    """The tower layers a composed model reads (HF's `vision_feature_layer`: an int or a
    list, -2 = the second-to-last layer's output)."""
    layer = cfg.get("vision_feature_layer", -1)
    return [layer] if isinstance(layer, int) else list(layer)


def keeps_cls(cfg) -> bool:
    return cfg.get("vision_feature_select_strategy", "default") == "full"


class ClipVisionTower(nn.Module):
    """NHWC pixels [n, h, w, c] -> the selected hidden states [n, tokens, d * layers]: the
    configured layers' outputs, concatenated, without the CLS token unless the strategy is
    `full`; the post LayerNorm is never applied (LLaVA)."""

    cfg: Any  # composed model config; the tower's own fields under `vision`

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        out = VisionTransformer(c.vision, dtype_of(c.dtype), dtype_of(c.param_dtype),
                                c.scan_layers, c.remat_policy, name="vision_model")(pixel_values)
        layers = feature_layers(c)
        return select_features(out["hidden_states"], layers[0] if len(layers) == 1 else layers,
                               keep_cls=keeps_cls(c), has_cls=c.vision.use_class_token)


def tokens_per_image(cfg, image_size=None) -> int:
    """Patches of an image (`image_size` (h, w); default: the configured square) plus the
    CLS token when the strategy keeps it."""
    v = cfg.vision
    h, w = image_size if image_size is not None else (v.image_size, v.image_size)
    grid = (h // v.patch_size) * (w // v.patch_size)
    return grid + (1 if keeps_cls(cfg) and v.use_class_token else 0)


def layers_run(cfg) -> int:
    """How many encoder layers the selected features need."""
    n = cfg.vision.num_hidden_layers
    return max(layer % (n + 1) for layer in feature_layers(cfg))


def forward_flops(cfg) -> float:
    """Matmul FLOPs of one image through the layers the features need."""
    v = cfg.vision
    grid = (v.image_size // v.patch_size) ** 2
    t = grid + (1 if v.use_class_token else 0)
    d, f = v.hidden_size, v.intermediate_size
    patch = 2 * grid * v.patch_size ** 2 * v.num_channels * d
    per_layer = 2 * t * 4 * d * d + 2 * t * 2 * d * f + 2 * 2 * t * t * d
    return patch + layers_run(cfg) * per_layer


def feature_size(cfg) -> int:
    return cfg.vision.hidden_size * len(feature_layers(cfg))


def check_vision(v, where: str = "vision config") -> None:
    """The tower's constraints on a vision config (or a dict of its fields): positive
    integer sizes, a sane layer count, heads dividing the width, patches tiling the image."""
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels",
                 "image_size", "patch_size"):
        checks.positive_int(v, name, where)
    checks.layer_count(v, "num_hidden_layers", where)
    checks.divides(v, "num_attention_heads", "hidden_size", where)
    checks.divides(v, "patch_size", "image_size", where)
    checks.positive_number(v, "layer_norm_eps", where)


def vision_from_hf(hf: dict, where: str = "config.json", defaults=None):
    d, where = vision_fields_from_hf(hf, where, VISION_DEFAULTS, ("clip_vision_model",),
                                     "clip", defaults, tower="a CLIP vision tower")
    check_vision(d, where)  # before anything is built from the values
    return mc.vision_config(**d)


def vision_to_hf(v) -> dict:
    if not (v.use_class_token and v.pre_layernorm and v.post_layernorm and v.qkv_bias
            and not v.patch_bias and not v.fused_qkv and v.attn_out_name == "out_proj"
            and not v.embeddings_as_parameters and not v.post_layernorm_tokens):
        raise UnsupportedModelError(
            "only OpenAI-CLIP-shaped vision towers (class token, pre/post LayerNorm, separate "
            "q/k/v projections with bias, out_proj, no patch bias) can be written as an HF "
            "CLIPVisionModel")
    return {"model_type": "clip_vision_model", **{k: v[k] for k in VISION_DEFAULTS}}


register_encoder("clip", EncoderSpec(
    module=ClipVisionTower, config=mc.vision_config, tokens_per_image=tokens_per_image,
    flops=forward_flops, feature_size=feature_size, from_hf=vision_from_hf, to_hf=vision_to_hf,
    check=check_vision, hf_model_types=lambda: ("clip_vision_model", "clip")))


# ---- the tower on its own: HF `CLIPVisionModel` (`model_type` clip_vision) ----------------

# Parts of a full CLIP (text + vision) checkpoint that a vision-only model does not use.
CLIP_TEXT_KEYS = [r"^text_model\.", r"^text_projection\.", r"^visual_projection\.",
                  r"^logit_scale$"]


def _blank_image(cfg):
    v = cfg.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),)


register_model("clip_vision", ModelFamily(
    module=VisionModel, config=mc.clip_vision_model_config, init_inputs=_blank_image,
    generates=False, hf_model_types=lambda: ("clip_vision_model", "clip"),
    from_hf=lambda hf, where="config.json": mc.clip_vision_model_config(
        vision_from_hf(hf, where)),
    to_hf=lambda cfg: {**vision_to_hf(cfg.vision), "architectures": ["CLIPVisionModel"]},
    key_aliases=((r"^(?!vision_model\.)(?!text_model\.)(?=(embeddings|encoder|pre_layrnorm|"
                  r"post_layernorm)\.)", "vision_model."),),
    unused_keys=lambda cfg: list(CLIP_TEXT_KEYS),
    check=lambda cfg, where="model config": check_vision(cfg.vision, where)))
