"""KV-cache generation and sampling."""
from mllm_jax.infer.generate import generate  # noqa: F401
