"""LLaVA-1.5 7B stage 2 (visual instruction tuning): projector + LLM train, vision frozen.

Published settings: global batch 128, lr 2e-5, 1 epoch of the 665K mix (5197 steps),
cosine with 3% warmup, no weight decay, max length 2048. Set init.orbax_checkpoint to
stage 1's `final` export.
"""
from mllm_jax.train import recipe


def get_config():
    c = recipe.llava15("llava-1.5-7b")
    c.stage.name = "stage2"
    c.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
    c.train.lr = 2e-5
    c.train.global_batch_size = 128
    c.train.num_steps = 5197
    return c
