"""BLIP-2 stage 1 with the frozen EVA ViT-g/14 (its post LayerNorm, LAVIS's ln_vision,
trained): the published settings of `train.blip2_recipe` with batch 1680."""
from mllm_jax.train import blip2_recipe


def get_config():
    c = blip2_recipe.stage1(blip2_recipe.vit_g_model(), batch=1680)
    c.stage.trainable = [blip2_recipe.QFORMER_PARTS, r"^vision_model/post_layernorm/"]
    return c
