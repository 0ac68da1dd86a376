"""BLIP-2 stage 2 with OPT-2.7B: generative pre-training of the Q-Former and projection
(vision tower and LLM frozen), the published settings of `train.blip2_stages` with batch 1920.
Set init.orbax_checkpoint to a blip2-opt-2.7b tree holding stage 1's Q-Former and data.json
to image-caption pairs."""
from mllm_jax.train import blip2_stages


def get_config():
    return blip2_stages.blip2_stage2("blip2-opt-2.7b", batch=1920)
