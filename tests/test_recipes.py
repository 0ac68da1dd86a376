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
    assert c.train.global_batch_size == batch and c.train.lr == lr
    assert c.train.num_steps == steps  # one epoch: 558K / 256, 665K / 128
    assert c.train.warmup_ratio == 0.03 and c.train.weight_decay == 0.0
    assert 1 + 576 + c.data.text_len == 2048  # BOS + image tokens + text = max length
    assert c.model.image_seq_length == 576 and c.model.vision.image_size == 336


def test_overrides_keep_types_and_reject_unknown_fields():
    c = config_file.load(os.path.join(REPO, "configs", "llava15_tiny_stage1.py"))
    config_file.apply_overrides(c, ["config.train.lr=3", "train.num_steps=7",
                                    "mesh.fsdp=-1", "stage.name=s1"])
    assert c.train.lr == 3.0 and isinstance(c.train.lr, float)
    assert c.train.num_steps == 7 and c.mesh.fsdp == -1 and c.stage.name == "s1"
    with pytest.raises(KeyError, match="train.nope"):
        config_file.apply_overrides(c, ["train.nope=1"])
    with pytest.raises(ValueError, match="must look like"):
        config_file.apply_overrides(c, ["train.lr"])


def test_a_typo_names_the_field_and_the_nearest_ones(tmp_path, capsys):
    from mllm_jax.cli import main
    code = main(["train", "--config", os.path.join(REPO, "configs", "llava15_tiny_stage1.py"),
                 "--workdir", str(tmp_path / "w"), "--config.train.lrr=1"])
    err = capsys.readouterr().err
    assert code != 0 and "'train.lrr'" in err and "did you mean train.lr" in err, err
    assert not (tmp_path / "w").exists()  # refused before any work
    # A field in the wrong section: the same leaf elsewhere is suggested.
    c = config_file.load(os.path.join(REPO, "configs", "llava15_tiny_stage1.py"))
    with pytest.raises(KeyError, match="did you mean .*train.seed"):
        config_file.apply_overrides(c, ["stage.seed=3"])


def test_a_recipe_cannot_add_fields(tmp_path):
    """Loaded recipes are locked: a misspelt assignment in a recipe, or later, is an error."""
    recipe_file = tmp_path / "bad_recipe.py"
    recipe_file.write_text("from mllm_jax.train import recipe\n\n\ndef get_config():\n"
                           "    c = recipe.base('tiny-llava')\n"
                           "    c.train.checkpoint_evry = 5\n    return c\n")
    with pytest.raises(KeyError, match="checkpoint_evry"):
        config_file.load(str(recipe_file))
    c = config_file.load(os.path.join(REPO, "configs", "llava15_tiny_stage1.py"))
    with pytest.raises(AttributeError):
        c.train.checkpoint_evry = 5
    c.model.text.some_new_field = 1  # model configs stay open: families differ in fields
