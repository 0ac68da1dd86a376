"""Tiny random-initialized HF models, built with transformers' own classes, for parity and
round-trip tests (no model hub is reachable here).

`build_*(**config_overrides)` returns a torch model in eval mode; `make_*(path, ...)` builds
one and saves it with `save_pretrained` into `path`, returning the directory. Every builder
is seeded (`seed=`), and by default `randomize_extras_` fills the parameters HF initializes
to constants (biases -> 0, norm scales -> 1) with random values so that a converter that
drops or transposes them is caught. `initializer_range` defaults larger than HF's 0.02 so
that logits are O(1) and an absolute tolerance means something.
"""
import os

import numpy as np
import torch
from transformers import (Blip2QFormerConfig, Blip2QFormerModel, CLIPVisionConfig,
                          CLIPVisionModel, InstructBlipQFormerConfig, InstructBlipQFormerModel,
                          LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

TEXT_DEFAULTS = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
VISION_DEFAULTS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, image_size=28, patch_size=7, num_channels=3,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5, initializer_range=0.1)
# Non-default where it matters: cross-attention every 2nd of 3 layers, layer_norm_eps.
QFORMER_DEFAULTS = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=16,
                        layer_norm_eps=1e-6, cross_attention_frequency=2, encoder_hidden_size=24,
                        initializer_range=0.1)
QFORMER_CLASSES = {"blip_2_qformer": (Blip2QFormerConfig, Blip2QFormerModel),
                   "instructblip_qformer": (InstructBlipQFormerConfig, InstructBlipQFormerModel)}
TEXT_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM),
                "mistral": (MistralConfig, MistralForCausalLM),
                "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@torch.no_grad()
def randomize_extras_(model, seed=0, std=0.1):
    """Fills every bias with N(0, std) and every norm weight with 1 + N(0, std), in place."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif leaf == "weight" and p.ndim == 1:  # LayerNorm / RMSNorm scales
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * std)
    return model


def _finish(model, seed, randomize, attn_implementation):
    if randomize:
        randomize_extras_(model, seed=seed + 1)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def text_config(model_type="llama", **overrides):
    config_cls, _ = TEXT_CLASSES[model_type]
    return config_cls(**{**TEXT_DEFAULTS, **overrides})


def vision_config(**overrides):
    return CLIPVisionConfig(**{**VISION_DEFAULTS, **overrides})


def build_causal_lm(model_type="llama", *, seed=0, randomize=True, attn_implementation=None,
                    **config_overrides):
    torch.manual_seed(seed)
    _, model_cls = TEXT_CLASSES[model_type]
    model = model_cls(text_config(model_type, **config_overrides))
    return _finish(model, seed, randomize, attn_implementation)


def build_llama(**kw):
    return build_causal_lm("llama", **kw)


def build_qwen2(**kw):
    return build_causal_lm("qwen2", **kw)


def build_mistral(**kw):
    return build_causal_lm("mistral", **kw)


def build_clip_vision(*, seed=0, randomize=True, attn_implementation=None,
                      **config_overrides):
    torch.manual_seed(seed)
    model = CLIPVisionModel(vision_config(**config_overrides))
    return _finish(model, seed, randomize, attn_implementation)


def build_qformer(model_type="blip_2_qformer", *, seed=0, randomize=True,
                  attn_implementation=None, **config_overrides):
    """A bare Blip2QFormerModel / InstructBlipQFormerModel (by `model_type`)."""
    torch.manual_seed(seed)
    config_cls, model_cls = QFORMER_CLASSES[model_type]
    model = model_cls(config_cls(**{**QFORMER_DEFAULTS, **config_overrides}))
    return _finish(model, seed, randomize, attn_implementation)


def build_llava(*, text_model_type="llama", text_overrides=None, vision_overrides=None,
                seed=0, randomize=True, attn_implementation=None, **config_overrides):
    """LlavaForConditionalGeneration with a tiny CLIP tower and a tiny text model. The image
    token defaults to the last vocabulary id; `image_seq_length` to the tower's patch count."""
    torch.manual_seed(seed)
    text = text_config(text_model_type, **(text_overrides or {}))
    vision = vision_config(**(vision_overrides or {}))
    cfg = dict(image_token_index=text.vocab_size - 1,
               image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    cfg.update(config_overrides)
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, **cfg))
    return _finish(model, seed, randomize, attn_implementation)


def save(model, path):
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def make_causal_lm(path, model_type="llama", **kw):
    return save(build_causal_lm(model_type, **kw), path)


def make_llama(path, **kw):
    return save(build_llama(**kw), path)


def make_qwen2(path, **kw):
    return save(build_qwen2(**kw), path)


def make_mistral(path, **kw):
    return save(build_mistral(**kw), path)


def make_clip_vision(path, **kw):
    return save(build_clip_vision(**kw), path)


def make_llava(path, **kw):
    return save(build_llava(**kw), path)


def random_pixels(n, size, channels=3, seed=0):
    """(NHWC float32 for mllm_jax, NCHW torch tensor for HF) of the same normalized images."""
    nhwc = np.random.RandomState(seed).standard_normal((n, size, size, channels))
    nhwc = nhwc.astype(np.float32)
    return nhwc, torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))
