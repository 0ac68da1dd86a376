"""Connectors from encoder features to the LLM, each registered under its `projector.type`
(`linear`, `mlp2x_gelu`)."""
from mllm_jax.models.connectors import projection  # noqa: F401  (registers them)
