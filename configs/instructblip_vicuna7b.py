"""InstructBLIP instruction tuning with Vicuna-7B: Q-Former and projection train on
instruction data (vision tower and LLM frozen), the published settings of
`train.blip2_stages` with batch 128. Set init.orbax_checkpoint to the BLIP-2 checkpoint it
starts from and data.json to LLaVA-format instructions."""
from mllm_jax.train import blip2_stages


def get_config():
    return blip2_stages.instructblip("instructblip-vicuna-7b", batch=128)
