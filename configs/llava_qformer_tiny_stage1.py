"""Tiny LLaVA-style model with a Q-Former connector, stage 1 (BLIP-2's generative
pre-training: Q-Former + language projection trained, ViT and LLM frozen) on synthetic data:
runs on one CPU in seconds. The towers and the data are llava15_tiny_stage1's, so the two
connectors compare on the same data (override `data.*` for real data, e.g. the demo's
`--config.data.source=llava_json --config.data.json=DEMO/data/captions_train.json ...`)."""
from mllm_jax.models.connectors.qformer import qformer_config
from mllm_jax.train import recipe

QUERIES = 8  # image tokens the LLM sees (tiny-llava's ViT gives 16 patch tokens)


def model_config():
    """tiny-llava with 8 Q-Former queries in place of its patch tokens: a 2-layer Q-Former
    as wide as the ViT, both layers cross-attending to its features."""
    m = recipe.base("tiny-llava").model
    m.projector = qformer_config(num_query_tokens=QUERIES, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128,
                                 cross_attention_frequency=1,
                                 encoder_hidden_size=m.vision.hidden_size,
                                 vocab_size=m.text.vocab_size)
    m.image_seq_length = QUERIES
    return m


def get_config():
    c = recipe.base("tiny-llava")
    c.model = model_config()
    c.stage.name = "stage1"
    c.stage.trainable = [recipe.PROJECTOR]
    c.train.lr = 1e-3
    c.train.update(global_batch_size=8, num_steps=6, log_every=2, checkpoint_every=2)
    c.data.text_len = 16
    return c
