"""Language-model decoders, each registered under its `text.model_type`: decoder-only
(llama, mistral, qwen2, opt) and encoder-decoder (t5, with the seq2seq_lm model family)."""
from mllm_jax.models.decoders import llama, opt  # noqa: F401  (registers them)
from mllm_jax.models.decoders import t5  # noqa: F401  (registers t5, seq2seq_lm)
