"""The LLaVA-1.5 recipes carry the published hyper-parameters."""
import os

import pytest

from mllm_jax.train import config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("stage,trainable,batch,lr,steps", [
    (1, ["^multi_modal_projector/"], 256, 1e-3, 2181),
    (2, ["^multi_modal_projector/", "^language_model/"], 128, 2e-5, 5197),
])
def test_llava15_7b_recipes(stage, trainable, batch, lr, steps):
    c = config_file.load(os.path.join(REPO, "configs", f"llava15_7b_stage{stage}.py"))
    assert list(c.stage.trainable) == trainable
    assert c.train.global_batch_size == batch and c.optim.lr == lr
    assert c.train.num_steps == steps  # one epoch: 558K / 256, 665K / 128
    assert c.optim.warmup_ratio == 0.03 and c.optim.weight_decay == 0.0
    assert 1 + 576 + c.data.text_len == 2048  # BOS + image tokens + text = max length
    assert c.model.image_seq_length == 576 and c.model.vision.image_size == 336


def test_overrides_keep_types_and_reject_unknown_fields():
    c = config_file.load(os.path.join(REPO, "configs", "llava15_tiny_stage1.py"))
    config_file.apply_overrides(c, ["config.optim.lr=3", "train.num_steps=7",
                                    "mesh.fsdp=-1", "stage.name=s1"])
    assert c.optim.lr == 3.0 and isinstance(c.optim.lr, float)
    assert c.train.num_steps == 7 and c.mesh.fsdp == -1 and c.stage.name == "s1"
    with pytest.raises(KeyError, match="optim.nope"):
        config_file.apply_overrides(c, ["optim.nope=1"])
    with pytest.raises(ValueError, match="must look like"):
        config_file.apply_overrides(c, ["optim.lr"])
