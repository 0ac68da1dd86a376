"""HF `config.json` <-> our model configs.

HF writes only the fields that differ from its config classes' defaults, so the defaults
below are those of transformers' `LlamaConfig`, `MistralConfig`, `Qwen2Config`,
`CLIPVisionConfig` and `LlavaConfig` (tests check them against the installed transformers).
"""
import json
import os

from mllm_jax import config as mc

TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)
# LlavaConfig's default vision tower (CLIP ViT-L/14-336) when config.json gives none.
LLAVA_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14)


class UnsupportedModelError(ValueError):
    pass


def read_config_json(directory) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory} has no config.json; point load_hf at an HF checkpoint directory "
            "(config.json + *.safetensors)")
    with open(path) as f:
        return json.load(f)


def _rope(hf: dict):
    """(theta, scaling) from either the v4 fields (rope_theta, rope_scaling) or v5's
    `rope_parameters`."""
    params = hf.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", "default")
        scaling = None if rope_type == "default" else {
            k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), scaling
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(hf.get("rope_theta", 10000.0)), scaling


def text_from_hf(hf: dict, where: str = "config.json"):
    model_type = hf.get("model_type", "llama")
    if model_type not in TEXT_DEFAULTS:
        raise UnsupportedModelError(
            f"{where}: text model_type {model_type!r} is not supported "
            f"(supported: {sorted(TEXT_DEFAULTS)})")
    d = dict(TEXT_DEFAULTS[model_type])
    d.update({k: hf[k] for k in d if k in hf})
    heads = d["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or d.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d["hidden_size"] // heads
    theta, scaling = _rope(hf)
    if scaling is not None:
        from mllm_jax.models.rope import inverse_frequencies
        try:  # rejects unsupported rope types early
            inverse_frequencies(head_dim, theta, scaling)
        except (ValueError, KeyError) as e:
            raise UnsupportedModelError(f"{where}: {e}") from None
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{where}: qwen2 with use_sliding_window=true is not "
                                        "supported")
        d["sliding_window"] = None
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    return mc.text_config(
        model_type=model_type,
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        hidden_act=hf.get("hidden_act", "silu"), rms_norm_eps=float(d["rms_norm_eps"]),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=d["max_position_embeddings"],
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=d["sliding_window"],
        bos_token_id=hf.get("bos_token_id", 1), eos_token_id=_first(hf.get("eos_token_id", 2)),
        pad_token_id=hf.get("pad_token_id"),
    )


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def vision_from_hf(hf: dict, where: str = "config.json", defaults=None):
    model_type = hf.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise UnsupportedModelError(
            f"{where}: vision model_type {model_type!r} is not supported (supported: "
            "clip_vision_model)")
    if model_type == "clip":
        hf = hf.get("vision_config", {})
    d = dict(VISION_DEFAULTS)
    d.update(defaults or {})
    d.update({k: hf[k] for k in VISION_DEFAULTS if k in hf})
    return mc.vision_config(**d)


def from_hf(hf: dict, where: str = "config.json"):
    """Our model config for an HF config dict."""
    model_type = hf.get("model_type")
    if model_type == "llava":
        text = text_from_hf(hf.get("text_config") or {}, where + " text_config")
        # LlavaConfig uses its ViT-L/14-336 defaults only when vision_config is absent; a
        # given (even partial or empty) vision_config is completed with CLIPVisionConfig's.
        vision_hf = hf.get("vision_config")
        vision = vision_from_hf(vision_hf or {}, where + " vision_config",
                                defaults=LLAVA_VISION_DEFAULTS if vision_hf is None else None)
        layer = hf.get("vision_feature_layer", -2)
        cfg = mc.llava_config(
            vision=vision, text=text,
            projector=mc.projector_config(type="mlp2x_gelu",
                                          bias=bool(hf.get("multimodal_projector_bias", True)),
                                          hidden_act=hf.get("projector_hidden_act", "gelu")),
            image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            image_seq_length=hf.get("image_seq_length", 576),
        )
        cfg.vision_feature_layer = layer if isinstance(layer, int) else list(layer)
        # LlavaForConditionalGeneration ties on the top-level flag, which LlavaConfig sets when
        # either it or text_config's flag is true.
        cfg.text.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False)
                                            or cfg.text.tie_word_embeddings)
        return cfg
    if model_type in TEXT_DEFAULTS:
        return mc.llm_config(text_from_hf(hf, where))
    if model_type in ("clip_vision_model", "clip"):
        return mc.clip_vision_model_config(vision_from_hf(hf, where))
    raise UnsupportedModelError(
        f"{where}: model_type {model_type!r} is not supported; supported: llava, "
        f"{', '.join(sorted(TEXT_DEFAULTS))}, clip_vision_model")


def text_to_hf(t) -> dict:
    hf = {
        "model_type": t.model_type,
        "architectures": [ARCHITECTURES[t.model_type]],
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim,
        "hidden_act": t.hidden_act, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": _plain(t.rope_scaling),
        "max_position_embeddings": t.max_position_embeddings,
        "mlp_bias": t.mlp_bias, "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    if t.model_type == "qwen2":
        if not t.qkv_bias or t.o_bias:
            raise UnsupportedModelError("qwen2 has biases on q/k/v and none on o_proj")
        hf["use_sliding_window"] = False
    else:
        if t.qkv_bias != t.o_bias:
            raise UnsupportedModelError(
                f"{t.model_type} in HF has attention_bias for all of q/k/v/o or none; this "
                f"config has qkv_bias={t.qkv_bias}, o_bias={t.o_bias}")
        hf["attention_bias"] = t.qkv_bias
    if t.model_type == "mistral":
        hf["sliding_window"] = t.sliding_window
    return hf


def _plain(v):
    if v is None:
        return None
    return v.to_dict() if hasattr(v, "to_dict") else dict(v)


def vision_to_hf(v) -> dict:
    if not (v.use_class_token and v.pre_layernorm and v.post_layernorm and v.qkv_bias
            and not v.patch_bias):
        raise UnsupportedModelError(
            "only OpenAI-CLIP-shaped vision towers (class token, pre/post LayerNorm, q/k/v "
            "bias, no patch bias) can be written as an HF CLIPVisionModel")
    return {"model_type": "clip_vision_model",
            **{k: v[k] for k in VISION_DEFAULTS}}


def to_hf(cfg) -> dict:
    """The config.json dict for our model config."""
    if cfg.model_type == "llava":
        if cfg.projector.type != "mlp2x_gelu":
            raise UnsupportedModelError(
                f"projector type {cfg.projector.type!r} has no HF LlavaForConditionalGeneration "
                "equivalent (it has mlp2x_gelu only)")
        layer = cfg.vision_feature_layer
        return {
            "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": vision_to_hf(cfg.vision), "text_config": text_to_hf(cfg.text),
            "image_token_index": cfg.image_token_index,
            "projector_hidden_act": cfg.projector.get("hidden_act", "gelu"),
            "multimodal_projector_bias": cfg.projector.bias,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
            "image_seq_length": cfg.image_seq_length,
            "tie_word_embeddings": cfg.text.tie_word_embeddings,
        }
    if cfg.model_type == "causal_lm":
        return text_to_hf(cfg.text)
    if cfg.model_type == "clip_vision":
        return {**vision_to_hf(cfg.vision), "architectures": ["CLIPVisionModel"]}
    raise UnsupportedModelError(f"model_type {cfg.model_type!r} cannot be written as HF")
