"""Connectors from encoder features to the LLM, each registered under its `projector.type`
(`linear`, `mlp2x_gelu`, `qformer`)."""
from mllm_jax.models.connectors import projection, qformer  # noqa: F401  (registers them)
