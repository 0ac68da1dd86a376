"""Decoder-only LLMs, each registered under its `text.model_type` (llama, mistral, qwen2)."""
from mllm_jax.models.decoders import llama  # noqa: F401  (registers them)
