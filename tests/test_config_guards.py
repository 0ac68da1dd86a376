"""Training options are checked before any work: a bad override value, a count of 0, an
unknown dtype or objective, an invalid regex, a batch that does not divide the mesh or a
mesh that does not fit the devices is a clear error (exit 1, no traceback) naming the field,
the value and what would be accepted, every problem at once; the workdir is not created."""
import os

import pytest

from mllm_jax.cli import main
from mllm_jax.train import config_file, recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "llava15_tiny_stage1.py")


def run_train(tmp_path, capsys, *overrides):
    """`mllm-jax train` on the tiny recipe (8 simulated devices); (exit code, stderr)."""
    code = main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"),
                 *[f"--config.{o}" for o in overrides]])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("override,expected", [
    ("train.global_batch_size=abc",
     "train.global_batch_size=abc': train.global_batch_size takes an integer (now 8), "
     "not 'abc'"),
    ("train.lr=fast", "train.lr=fast': train.lr takes a number (now 0.001), not 'fast'"),
    ("train.global_batch_size=[1,2]", "train.global_batch_size takes an integer (now 8), "
                                      "not '[1,2]'"),
    ("stage.trainable=^language_model/", "stage.trainable takes a list"),
    ("train.async_checkpointing=maybe", "train.async_checkpointing takes True or False"),
])
def test_an_override_value_of_the_wrong_type_names_the_override_field_and_type(
        tmp_path, capsys, override, expected):
    code, err = run_train(tmp_path, capsys, override)
    assert code == 1 and err.startswith("mllm-jax train: error: ") and expected in err, err
    assert not (tmp_path / "w").exists()  # refused before any work


@pytest.mark.parametrize("override,expected", [
    ("train.checkpoint_every=0", "train.checkpoint_every = 0: must be an integer >= 1"),
    ("train.global_batch_size=0", "train.global_batch_size = 0: must be an integer >= 1"),
    ("train.log_every=0", "train.log_every = 0: must be an integer >= 1"),
    ("train.max_nan_streak=0", "train.max_nan_streak = 0: must be an integer >= 1"),
    ("train.loss_chunk=0", "train.loss_chunk = 0: must be an integer >= 1"),
    ("data.text_len=0", "data.text_len = 0: must be an integer >= 1"),
    ("data.workers=-1", "data.workers = -1: must be an integer >= 0"),
    ("train.num_steps=-1", "train.num_steps = -1: must be an integer >= 0"),
    ("train.lr=-1", "train.lr = -1.0: must be a number in [0, inf)"),
    ("train.warmup_ratio=2", "train.warmup_ratio = 2.0: must be a number in [0, 1]"),
    ("train.micro_batches=3", "train.micro_batches = 3 does not divide "
                              "train.global_batch_size = 8 (each micro-batch takes an equal "
                              "share of the batch): use micro_batches 2 or 4"),
    ("stage.frozen_dtype=float7", "stage.frozen_dtype = 'float7' is not a known dtype; use "
                                  "float32, bfloat16, float16 or ''"),
    ("model.param_dtype=float7", "model.param_dtype = 'float7' is not a known dtype; use "
                                 "float32, bfloat16, float16"),
    ("stage.trainable=['(']", "stage.trainable[0] = '(' is not a valid regular expression: "
                              "missing ), unterminated subpattern at position 0"),
    ("train.lr_groups=[['proj','[',1e-3]]", "train.lr_groups[0] regex = '[' is not a valid "
                                            "regular expression: unterminated character set"),
    ("stage.objective=ppo", "stage.objective = 'ppo' is not a registered objective; known: "
                            "blip2_stage1, dpo, lm"),
    # The model family's own checks run on the training config's model section too.
    ("model.text.num_attention_heads=5", "num_key_value_heads = 2 does not divide "
                                         "num_attention_heads = 5"),
    ("model.text.num_hidden_layers=200000", "num_hidden_layers = 200000 is more than 1024"),
])
def test_a_bad_value_names_the_field_the_value_and_what_is_accepted(tmp_path, capsys,
                                                                    override, expected):
    code, err = run_train(tmp_path, capsys, override)
    assert code == 1 and expected in err, err
    assert not (tmp_path / "w").exists()


def test_keep_checkpoints_0_is_refused_saying_why(tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "train.keep_checkpoints=0")
    assert code == 1, err
    assert "train.keep_checkpoints = 0: must be an integer >= 1" in err
    assert "including the one a preempted run needs to resume" in err
    assert not (tmp_path / "w").exists()


def test_every_problem_is_listed_at_once_and_unknown_fields_keep_their_suggestions(
        tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "train.global_batch_size=abc",
                          "train.checkpoint_every=0", "stage.frozen_dtype=float7",
                          "train.lrr=1")
    assert code == 1
    assert "4 problems in the config" in err, err
    for expected in ("train.global_batch_size takes an integer",
                     "train.checkpoint_every = 0", "stage.frozen_dtype = 'float7'",
                     "no field 'train.lrr' in the config; did you mean train.lr"):
        assert expected in err, (expected, err)


def test_a_recipe_file_with_a_bad_value_is_refused_naming_the_file(tmp_path):
    recipe_file = tmp_path / "bad_recipe.py"
    recipe_file.write_text("from mllm_jax.train import recipe\n\n\ndef get_config():\n"
                           "    c = recipe.base('tiny-llava')\n"
                           "    c.train.keep_checkpoints = 0\n    return c\n")
    with pytest.raises(ValueError, match=f"{recipe_file}: invalid config: "
                                         "train.keep_checkpoints = 0"):
        config_file.load(str(recipe_file))
    # An override may repair it: overrides are applied before the values are checked.
    cfg = config_file.load(str(recipe_file), ["train.keep_checkpoints=2"])
    assert cfg.train.keep_checkpoints == 2


def test_a_batch_that_does_not_split_over_the_mesh_suggests_a_batch_and_a_mesh(
        tmp_path, capsys):
    code, err = run_train(tmp_path, capsys, "train.global_batch_size=12")
    assert code == 1, err
    assert ("train.global_batch_size = 12 does not split over the mesh's data x fsdp = 8 x 1 "
            "= 8 batch shards (mesh data=8, fsdp=1, tensor=1 on 8 devices") in err, err
    assert "use train.global_batch_size 8 or 16" in err
    assert ("or a mesh with 4 batch shards: --config.mesh.data=4 --config.mesh.fsdp=1 "
            "--config.mesh.tensor=2") in err
    assert not (tmp_path / "w").exists()
    # With micro-batches the suggested batches are multiples of both.
    code, err = run_train(tmp_path, capsys, "train.global_batch_size=12", "mesh.data=2",
                          "mesh.fsdp=-1", "train.micro_batches=3")
    assert code == 1 and "data x fsdp = 2 x 4 = 8" in err and "24" in err, err


@pytest.mark.parametrize("mesh,expected", [
    (["mesh.data=3"], "mesh data=3, fsdp=1, tensor=1 needs 3 devices, 8 are available: make "
                      "the sizes multiply to 8, e.g. --config.mesh.data=-1"),
    (["mesh.fsdp=3"], "mesh data=-1, fsdp=3, tensor=1: mesh.fsdp=3 does not divide the 8 "
                      "devices (mesh.data=-1 takes the rest); use sizes whose product is "
                      "one of 1, 2, 4, 8"),
    (["mesh.fsdp=-1"], "mesh data=-1, fsdp=-1, tensor=1: at most one axis may be -1; set "
                       "mesh.fsdp to a size"),
    (["mesh.tensor=0"], "mesh.tensor = 0: must be a positive integer, or -1"),
])
def test_a_mesh_that_does_not_fit_the_devices_is_refused_before_any_work(tmp_path, capsys,
                                                                         mesh, expected):
    code, err = run_train(tmp_path, capsys, *mesh)
    assert code == 1 and expected in err, err
    assert not (tmp_path / "w").exists()


def test_train_checks_a_config_built_in_code(tmp_path):
    """The API checks too: a config assembled in Python never reached `config_file`."""
    from mllm_jax.train import train
    cfg = recipe.base("tiny-llava")
    cfg.train.keep_checkpoints = 0
    cfg.stage.trainable = ["^multi_modal_projector/", "*"]
    with pytest.raises(ValueError) as e:
        train(cfg, str(tmp_path / "w"))
    assert "train.keep_checkpoints = 0" in str(e.value)
    assert "stage.trainable[1] = '*' is not a valid regular expression" in str(e.value)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field,value,expected", [
    ("stage.trainable", ["^multi_modal_projector/", "^language_model/(model"],
     r"stage.trainable\[1\] = '\^language_model/\(model' is not a valid regular expression"),
    ("train.lr_groups", [["proj", "^multi_modal_projector/[", 1e-3]],
     r"train.lr_groups\[0\] regex = '\^multi_modal_projector/\[' is not a valid regular "
     "expression: unterminated character set"),
])
def test_build_trainer_names_an_invalid_regex_too(field, value, expected):
    """`build_trainer` (used without `train`, e.g. to compile a step) names the field."""
    import jax

    from mllm_jax.train import build_trainer
    cfg = recipe.base("tiny-llava")
    section, leaf = field.split(".")
    cfg[section][leaf] = value
    with pytest.raises(ValueError, match=expected):
        build_trainer(cfg, devices=jax.devices()[:1], abstract=True)
