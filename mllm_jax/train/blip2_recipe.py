"""The training configs of BLIP-2's stage-1 Q-Former pre-training (`configs/blip2_stage1_*`).

Published settings (Li et al. 2023, sec. 3.4, and LAVIS's pretrain_stage1 config): AdamW
with beta (0.9, 0.98) and weight decay 0.05, peak learning rate 1e-4 after a linear warmup of
2k steps, cosine decay to a minimum of 1e-5, 250k steps, batch 2320 (ViT-L) / 1680 (ViT-g),
32 queries, 224 px images, captions of at most 32 tokens, the ViT frozen (stored in 16 bit),
no gradient clipping, the three losses weighted equally, label smoothing 0.1 on ITC and ITG.

Not the same as LAVIS: LAVIS decays every weight of two or more dimensions (the query
tokens too), here kernels and embeddings are decayed; LAVIS's training images go through
RandomResizedCrop(0.5, 1) and horizontal flips, here the pipeline's resize and centre crop.
The Q-Former starts from BERT-base in BLIP-2 (its self-attention and feed-forward weights
in both the query and the text paths, cross-attention random): give it as
init.orbax_checkpoint, a blip2_qformer tree holding those weights.
"""
import ml_collections

from mllm_jax.models.blip2_qformer import blip2_qformer_config
from mllm_jax.models.connectors.qformer import qformer_config
from mllm_jax.train import recipe

# Everything but the vision tower.
QFORMER_PARTS = r"^(?!vision_model/)"


def stage1(model: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
    c = recipe.base("tiny-llava")
    c.model = model
    c.stage.update(name="blip2_stage1", trainable=[QFORMER_PARTS], objective="blip2_stage1",
                   frozen_dtype="bfloat16")
    with c.stage.unlocked():
        c.stage.objective_kwargs = {"itc_weight": 1.0, "itm_weight": 1.0, "itg_weight": 1.0,
                                    "label_smoothing": 0.1}
    c.train.update(global_batch_size=batch, num_steps=250_000, lr=1e-4, warmup_steps=2000,
                   end_lr_ratio=0.1, weight_decay=0.05, b1=0.9, b2=0.98, eps=1e-8,
                   grad_clip=0.0, checkpoint_every=5000, log_every=50)
    c.model.dtype = "bfloat16"
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    # data.json: image-caption pairs (LLaVA records with one caption turn, or {id, image,
    # caption}); data.tokenizer: bert-base-uncased with "[DEC]" added (id 30522).
    c.data.update(source="llava_json", images=1, max_length=32, workers=8)
    return c


def bert_base_qformer(encoder_hidden_size: int, **overrides) -> ml_collections.ConfigDict:
    """BERT-base's sizes with cross-attention every 2nd layer, text feed-forward weights,
    BERT's vocabulary plus [DEC]."""
    return qformer_config(num_query_tokens=32, use_qformer_text_input=True, vocab_size=30523,
                          encoder_hidden_size=encoder_hidden_size, **overrides)


def vit_l_model() -> ml_collections.ConfigDict:
    """CLIP ViT-L/14 at 224 px without its last layer (the second-to-last layer's output,
    CLS kept), LAVIS's trainable `ln_vision`."""
    return blip2_qformer_config(qformer=bert_base_qformer(1024), vision_feature_layer=-2,
                                vision_feature_select_strategy="full", ln_vision=True)


def vit_g_model() -> ml_collections.ConfigDict:
    """EVA ViT-g/14 with 39 of its 40 layers (as BLIP-2 drops the last), every token; the
    tower's own post LayerNorm over all tokens is LAVIS's `ln_vision` (HF keeps it there),
    trained with the Q-Former."""
    from mllm_jax.models.encoders.eva import eva_vision_config
    return blip2_qformer_config(vision=eva_vision_config(), qformer=bert_base_qformer(1408),
                                vision_feature_layer=None, ln_vision=False)
