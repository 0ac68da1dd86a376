"""Modality encoders, each registered under its `vision.type` (`clip`)."""
from mllm_jax.models.encoders import clip  # noqa: F401  (registers "clip")
