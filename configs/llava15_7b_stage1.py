"""LLaVA-1.5 7B stage 1 (feature alignment): only the projector trains, on captions.

Published settings: global batch 256, lr 1e-3, 1 epoch of LCS-558K (2181 steps), cosine with
3% warmup, no weight decay, max length 2048. Set init.hf_checkpoint to a converted start
(CLIP ViT-L/14-336 + Vicuna-7B-v1.5 in LLaVA layout).
"""
from mllm_jax.train import recipe


def get_config():
    c = recipe.llava15("llava-1.5-7b")
    c.stage.name = "stage1"
    c.stage.trainable = [recipe.PROJECTOR]
    c.train.lr = 1e-3
    c.train.global_batch_size = 256
    c.train.num_steps = 2181
    return c
