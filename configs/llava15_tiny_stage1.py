"""Tiny LLaVA stage 1 on synthetic data: runs on one CPU in seconds."""
from mllm_jax.train import recipe


def get_config():
    c = recipe.base("tiny-llava")
    c.stage.name = "stage1"
    c.stage.trainable = [recipe.PROJECTOR]
    c.train.lr = 1e-3
    c.train.update(global_batch_size=8, num_steps=6, log_every=2, checkpoint_every=2)
    c.data.text_len = 16
    return c
