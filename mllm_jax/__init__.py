"""mllm_jax: multimodal LLMs (vision encoder + connector + LLM) in JAX/Flax."""
from mllm_jax import config, presets
from mllm_jax.convert import (CheckpointMismatchError, UnsupportedModelError, abstract_params,
                              load_hf, load_orbax, save_hf, save_orbax)
from mllm_jax.models import build_model

__all__ = ["build_model", "load_hf", "save_hf", "load_orbax", "save_orbax", "presets", "config",
           "abstract_params", "CheckpointMismatchError", "UnsupportedModelError"]
