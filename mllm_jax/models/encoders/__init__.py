"""Modality encoders, each registered under its `vision.type` (`clip`, `eva`, `siglip`)."""
from mllm_jax.models.encoders import clip  # noqa: F401  (registers "clip")
from mllm_jax.models.encoders import eva  # noqa: F401  (registers "eva")
from mllm_jax.models.encoders import siglip  # noqa: F401  (registers "siglip")
