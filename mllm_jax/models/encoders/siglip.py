"""SigLIP's ViT as an MLLM's encoder (`vision.type = "siglip"`): HF `SiglipVisionModel`
(`model_type` siglip_vision_model, and the vision part of `SiglipModel`), as a configuration
of the ViT in `models/vit.py`: no class token, a patch conv with bias, tanh-approximate GELU
(`gelu_pytorch_tanh`), LayerNorm eps 1e-6, no pre LayerNorm, the post LayerNorm on every
output token, and with `vision_use_head` the attention-pooling head (`head/probe`,
`head/attention/{in_proj_weight, in_proj_bias, out_proj}`, `head/layernorm`, `head/mlp`),
its packed in-projection stored as torch stores it. Other image sizes resize the square
position grid bicubically, as HF's `interpolate_pos_encoding=True` does (torch's
`interpolate(mode="bicubic", align_corners=False)`, no antialias).

Paths are HF's: `vision_model/embeddings/patch_embedding`, `vision_model/encoder/layers_N/...`,
`vision_model/post_layernorm`, `vision_model/head/...`; under LLaVA `vision_tower/vision_model/
...`, as published llava-hf checkpoints store the tower.

Features under LLaVA (a composed config with `vision_feature_layer`): that layer's output
(several concatenated), never the post LayerNorm or the head. HF's LLaVA crops the first
token under the `default` strategy whatever the tower, so with SigLIP, which has no CLS
token, `default` drops the first patch and an image becomes (grid^2 - 1) tokens; `full`
keeps all grid^2 (LLaVA-OneVision's setting). Without `vision_feature_layer` the features
are the post-LayerNormed last hidden state, every patch (what PaliGemma's projector reads).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models.encoders.clip import feature_layers, keeps_cls
from mllm_jax.models.layers import ACTIVATIONS, dtype_of
from mllm_jax.models.registry import (EncoderSpec, ModelFamily, UnsupportedModelError,
                                      register_encoder, register_model)
from mllm_jax.models.vit import (VisionModel, VisionTransformer, select_features, selects_layers,
                                 vision_fields_from_hf)

# transformers' SiglipVisionConfig defaults (google/siglip-base-patch16-224); HF writes only
# the fields that differ from them.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                       vision_use_head=True)
HF_MODEL_TYPES = ("siglip_vision_model", "siglip")

# The settings of the shared ViT that make it SigLIP's tower.
SIGLIP_LAYOUT = dict(use_class_token=False, patch_bias=True, pre_layernorm=False,
                     post_layernorm=True, post_layernorm_tokens=True, qkv_bias=True,
                     fused_qkv=False, attn_out_name="out_proj", embeddings_as_parameters=False,
                     drop_partial_patches=True)


def siglip_vision_config(**overrides):
    """SigLIP's ViT (transformers' SiglipVisionConfig defaults: B/16 at 224 px)."""
    c = mc.vision_config(type="siglip", **VISION_DEFAULTS, **SIGLIP_LAYOUT)
    c.update(overrides)
    return c


class SiglipVisionTower(nn.Module):
    """NHWC pixels [n, h, w, c] -> features [n, tokens, d] (see the module docstring)."""

    cfg: Any  # composed model config; the tower's own fields under `vision`

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        out = VisionTransformer(c.vision, dtype_of(c.dtype), dtype_of(c.param_dtype),
                                c.scan_layers, c.remat_policy, name="vision_model")(pixel_values)
        if not selects_layers(c):
            return out["last_hidden_state"]
        layers = feature_layers(c)
        # has_cls=True: HF's LLaVA crops token 0 under `default` for every tower.
        return select_features(out["hidden_states"], layers[0] if len(layers) == 1 else layers,
                               keep_cls=keeps_cls(c), has_cls=True)


def tokens_per_image(cfg, image_size=None) -> int:
    """Patches of an image (`image_size` (h, w); default: the configured square), less the
    first under LLaVA's `default` strategy."""
    v = cfg.vision
    h, w = image_size if image_size is not None else (v.image_size, v.image_size)
    grid = (h // v.patch_size) * (w // v.patch_size)
    return grid - (1 if selects_layers(cfg) and not keeps_cls(cfg) else 0)


def layers_run(cfg) -> int:
    n = cfg.vision.num_hidden_layers
    if not selects_layers(cfg):
        return n
    return max(layer % (n + 1) for layer in feature_layers(cfg))


def forward_flops(cfg) -> float:
    """Matmul FLOPs of one image at the configured size through the layers the features
    need (2 per multiply-add; the pooling head, which features never read, not counted)."""
    v = cfg.vision
    t = (v.image_size // v.patch_size) ** 2
    d, f = v.hidden_size, v.intermediate_size
    patch = 2 * t * v.patch_size ** 2 * v.num_channels * d
    per_layer = 2 * t * 4 * d * d + 2 * t * 2 * d * f + 2 * 2 * t * t * d
    return patch + layers_run(cfg) * per_layer


def feature_size(cfg) -> int:
    layers = feature_layers(cfg) if selects_layers(cfg) else [-1]
    return cfg.vision.hidden_size * len(layers)


def check_vision(v, where: str = "vision config") -> None:
    """The tower's constraints on a vision config (or a dict of its fields). The patches
    need not tile the image: the conv drops what is left (so400m/14 at 384 px)."""
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels",
                 "image_size", "patch_size"):
        checks.positive_int(v, name, where)
    checks.layer_count(v, "num_hidden_layers", where)
    checks.divides(v, "num_attention_heads", "hidden_size", where)
    checks.positive_number(v, "layer_norm_eps", where)
    if v["patch_size"] > v["image_size"]:
        raise checks.InvalidConfigError(
            f"{where}: patch_size = {v['patch_size']!r} is larger than image_size = "
            f"{v['image_size']!r}")
    checks.one_of(v, "hidden_act", where, sorted(ACTIVATIONS))
    checks.one_of(v, "vision_use_head", where, (True, False))


def vision_from_hf(hf: dict, where: str = "config.json", defaults=None):
    """Our vision config from HF's `SiglipVisionConfig` dict (a composed config's
    `vision_config`, or a whole `SiglipConfig`'s); absent fields take transformers'
    defaults."""
    d, where = vision_fields_from_hf(hf, where, VISION_DEFAULTS, HF_MODEL_TYPES[:1],
                                     HF_MODEL_TYPES[1], defaults, tower="SigLIP")
    check_vision(d, where)  # before anything is built from the values
    return siglip_vision_config(**d)


def vision_to_hf(v) -> dict:
    wrong = [f"{k} = {v.get(k)!r} (needs {want!r})" for k, want in SIGLIP_LAYOUT.items()
             if v.get(k) != want]
    if wrong:
        raise UnsupportedModelError(
            "only SigLIP's layout can be written as an HF SiglipVisionModel; the vision "
            f"config has {'; '.join(wrong)}")
    return {"model_type": HF_MODEL_TYPES[0], **{k: v[k] for k in VISION_DEFAULTS}}


register_encoder("siglip", EncoderSpec(
    module=SiglipVisionTower, config=siglip_vision_config, tokens_per_image=tokens_per_image,
    flops=forward_flops, feature_size=feature_size, from_hf=vision_from_hf, to_hf=vision_to_hf,
    check=check_vision, hf_model_types=lambda: HF_MODEL_TYPES[:1]))


# ---- the tower on its own: HF `SiglipVisionModel` (`model_type` siglip_vision) --------------

# Parts of a full SigLIP (text + vision) checkpoint that a vision-only model does not use.
SIGLIP_TEXT_KEYS = [r"^text_model\.", r"^logit_scale$", r"^logit_bias$"]


def siglip_vision_model_config(vision=None, **overrides):
    c = mc.clip_vision_model_config(vision if vision is not None else siglip_vision_config())
    c.model_type = "siglip_vision"
    c.update(overrides)
    return c


def _blank_image(cfg):
    v = cfg.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),)


register_model("siglip_vision", ModelFamily(
    module=VisionModel, config=siglip_vision_model_config, init_inputs=_blank_image,
    generates=False, hf_model_types=lambda: HF_MODEL_TYPES,
    from_hf=lambda hf, where="config.json": siglip_vision_model_config(
        vision_from_hf(hf, where)),
    to_hf=lambda cfg: {**vision_to_hf(cfg.vision), "architectures": ["SiglipVisionModel"]},
    # transformers 5 saves SiglipVisionModel without the `vision_model.` level.
    key_aliases=((r"^(?!vision_model\.)(?!text_model\.)(?=(embeddings|encoder|post_layernorm|"
                  r"head)\.)", "vision_model."),),
    unused_keys=lambda cfg: list(SIGLIP_TEXT_KEYS),
    check=lambda cfg, where="model config": check_vision(cfg.vision, where)))
