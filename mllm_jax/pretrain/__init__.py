"""Pre-training of the towers a LLaVA model starts from: a CLIP-style contrastive image
encoder (`contrastive`) and a causal language model (`text_lm`)."""
from mllm_jax.pretrain.contrastive import ContrastiveResult, pretrain_contrastive
from mllm_jax.pretrain.text_lm import LMResult, pretrain_lm

__all__ = ["ContrastiveResult", "LMResult", "pretrain_contrastive", "pretrain_lm"]
