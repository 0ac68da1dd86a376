"""Decoder-only LLMs, each registered under its `text.model_type` (llama, mistral, qwen2,
opt)."""
from mllm_jax.models.decoders import llama, opt  # noqa: F401  (registers them)
