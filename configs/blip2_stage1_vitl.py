"""BLIP-2 stage 1 (representation pre-training of the Q-Former) with the frozen CLIP
ViT-L/14: ITC + ITM + ITG at the published settings (see `train.blip2_recipe`): batch 2320,
lr 1e-4 (2k warmup steps, cosine to 1e-5), AdamW (0.9, 0.98), weight decay 0.05, 250k steps.
Set data.json, data.tokenizer and init.orbax_checkpoint (the BERT-base-initialised start)."""
from mllm_jax.train import blip2_recipe


def get_config():
    return blip2_recipe.stage1(blip2_recipe.vit_l_model(), batch=2320)
