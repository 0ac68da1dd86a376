"""Tiny LLaVA stage 2 on synthetic data: runs on one CPU in seconds."""
import configs.common as common


def get_config():
    c = common.base("tiny-llava")
    c.stage.name = "stage2"
    c.stage.trainable = [common.PROJECTOR, common.LLM]
    c.optim.lr = 2e-5
    c.train.update(global_batch_size=8, num_steps=6, log_every=2, checkpoint_every=2)
    c.data.text_len = 16
    return c
