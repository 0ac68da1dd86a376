"""Tiny LLaVA-style model with a Q-Former connector, stage 2 (instruction tuning: Q-Former,
projection and LLM trained, as the LLaVA recipe does; `--config.stage.trainable=
'["^multi_modal_projector/"]'` keeps the LLM frozen as InstructBLIP does) on synthetic data.
Start it from stage 1 with `--config.init.orbax_checkpoint=STAGE1_WORKDIR/final`."""
import os

from mllm_jax.train import config_file, recipe

STAGE1 = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "llava_qformer_tiny_stage1.py")


def get_config():
    c = config_file.load(STAGE1)  # the same model and data
    c.stage.name = "stage2"
    c.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
    c.train.lr = 2e-5
    c.train.update(global_batch_size=8, num_steps=6, log_every=2, checkpoint_every=2)
    c.data.text_len = 16
    return c
