"""Linen modules: encoders, decoders, connectors, and the composed MLLM."""
import ml_collections

from mllm_jax.models.llava import Llava
from mllm_jax.models.llm import CausalLM
from mllm_jax.models.vit import VisionModel

MODEL_TYPES = {"llava": Llava, "causal_lm": CausalLM, "clip_vision": VisionModel}


def build_model(cfg: ml_collections.ConfigDict):
    """A Linen module for a model config (see `mllm_jax.presets`)."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type](cfg)
