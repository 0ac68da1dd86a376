"""KV-cache generation and sampling (`mllm_jax.infer.generate.generate`), and prompting a
checkpoint with its tokenizer and template (`mllm_jax.infer.prompting.Session`)."""
