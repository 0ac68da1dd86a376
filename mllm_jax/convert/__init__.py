"""HF checkpoints in and out; orbax checkpoints of converted models."""
from mllm_jax.convert.hf_io import CheckpointMismatchError, abstract_params, load_hf, save_hf
from mllm_jax.convert.finite import NonFiniteWeightsError, check_finite
from mllm_jax.convert.hf_config import UnsupportedModelError
from mllm_jax.convert.safetensors_io import SafetensorsError
from mllm_jax.models.registry import InvalidConfigError
from mllm_jax.convert.orbax_io import load_orbax, save_orbax

__all__ = ["load_hf", "save_hf", "load_orbax", "save_orbax", "abstract_params",
           "CheckpointMismatchError", "UnsupportedModelError", "NonFiniteWeightsError",
           "SafetensorsError", "InvalidConfigError", "check_finite"]
