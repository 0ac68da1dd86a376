"""Tiny BLIP-2 stage 1 on the shapes world's geometry (48 px images, 16 px patches, the
demo's ViT frozen): runs on one CPU. Synthetic pairs by default; the world's pairs with
  --config.data.source=llava_json --config.data.json=DATA/pairs_train.json
  --config.data.tokenizer=DATA/tokenizer --config.init.orbax_checkpoint=...
(the Q-Former's vocabulary is the world tokenizer's 512 ids plus the decoder token 512)."""
from mllm_jax import config as mc
from mllm_jax.models.blip2_qformer import blip2_qformer_config
from mllm_jax.models.connectors.qformer import qformer_config
from mllm_jax.train import blip2_recipe


def get_config():
    vision = mc.vision_config(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, image_size=48, patch_size=16)
    q = qformer_config(num_query_tokens=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128,
                       use_qformer_text_input=True, vocab_size=513, encoder_hidden_size=128,
                       max_position_embeddings=64)
    model = blip2_qformer_config(vision, q, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", ln_vision=False,
                                 image_text_hidden_size=64, dec_token_id=512)
    c = blip2_recipe.stage1(model, batch=16)
    c.stage.frozen_dtype = ""
    c.model.dtype = "float32"
    c.train.update(num_steps=6, warmup_steps=0, warmup_ratio=0.1, end_lr_ratio=0.1, lr=1e-3,
                   log_every=2, checkpoint_every=3)
    c.data.update(source="synthetic", text_len=16, max_length=24, workers=2)
    return c
