"""LLaVA-1.5 7B stage 1 (feature alignment): only the projector trains, on captions.

Published settings: global batch 256, lr 1e-3, 1 epoch of LCS-558K (2181 steps), cosine with
3% warmup, no weight decay, max length 2048.
"""
from mllm_jax.train import recipe


def get_config():
    c = recipe.base("llava-1.5-7b")
    c.init.hf_checkpoint = ""  # a converted LLaVA-style start (CLIP-L/336 + Vicuna-7B)
    c.stage.name = "stage1"
    c.stage.trainable = [recipe.PROJECTOR]
    c.stage.frozen_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat_policy = "dots_no_batch"
    c.optim.lr = 1e-3
    c.train.global_batch_size = 256
    c.train.num_steps = 2181
    c.data.text_len = 2048 - 576 - 1
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
