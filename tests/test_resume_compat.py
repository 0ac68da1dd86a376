"""Resuming with a config that differs from the checkpoint's.

Fields that change what the run computes (the frozen model's shape, the frozen
initialisation's seed, the batch size, the learning rate unless allowed) are refused, each
named with both values; a changed `stage.trainable` is refused naming the option
`train.resume_partial`, and with it the matching arrays are restored and the rest
initialised as a fresh run would.
"""
import flax
import jax
import numpy as np
import pytest

from configs import llava15_tiny_stage1
from mllm_jax.train import loop, recipe
from mllm_jax.train.checkpoints import ResumeConfigError

STEPS = 2


def _config(**train):
    c = llava15_tiny_stage1.get_config()
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.train.update(global_batch_size=4, num_steps=STEPS, checkpoint_every=STEPS,
                   log_every=1000, async_checkpointing=False, export_final=False)
    c.train.update(**train)
    c.data.text_len = 8
    return c


def _train(cfg, workdir):
    lines = []
    out = loop.train(cfg, str(workdir), log=lines.append, devices=jax.devices()[:1])
    out["log"] = lines
    return out


def _flat(tree):
    return {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A stage-1 run of STEPS steps with its checkpoint at the last step."""
    workdir = tmp_path_factory.mktemp("compat") / "run"
    out = _train(_config(), workdir)
    assert out["step"] == STEPS
    return workdir, out


def _copy(workdir, tmp_path):
    import shutil
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


def test_changed_frozen_model_seed_batch_and_lr_are_refused_naming_each(checkpointed,
                                                                       tmp_path):
    workdir = _copy(checkpointed[0], tmp_path)
    cfg = _config(global_batch_size=8, lr=3e-4, num_steps=STEPS + 1, log_every=1)
    cfg.model.text.intermediate_size = 96
    cfg.init.seed = 7
    cfg.model.remat_policy = "full+weights"  # how, not what: may change
    with pytest.raises(ResumeConfigError) as e:
        _train(cfg, workdir)
    msg = str(e.value)
    assert f"checkpoint step {STEPS}" in msg
    assert "model.text.intermediate_size: 128 in the checkpoint, 96 now" in msg
    assert "init.seed: 0 in the checkpoint, 7 now" in msg
    assert "train.global_batch_size: 4 in the checkpoint, 8 now" in msg
    assert "train.lr: " in msg and "add 'train.lr' to train.resume_may_change" in msg
    assert "start a new run in a new workdir" in msg
    # Fields that may change are not listed.
    assert "num_steps" not in msg and "log_every" not in msg and "remat" not in msg


def test_opted_in_lr_change_resumes(checkpointed, tmp_path):
    workdir = _copy(checkpointed[0], tmp_path)
    out = _train(_config(lr=3e-4, resume_may_change=["train.lr"]), workdir)
    assert out["start_step"] == STEPS


def test_changed_trainable_is_refused_naming_the_option(checkpointed, tmp_path):
    workdir = _copy(checkpointed[0], tmp_path)
    cfg = _config()
    cfg.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
    with pytest.raises(ResumeConfigError) as e:
        _train(cfg, workdir)
    msg = str(e.value)
    assert "stage.trainable:" in msg and "train.resume_partial=True" in msg
    assert "partial_restore" not in msg  # not orbax's advice


def test_resume_partial_restores_what_matches_and_initialises_the_rest(checkpointed,
                                                                       tmp_path):
    workdir, first = checkpointed
    workdir = _copy(workdir, tmp_path)
    cfg = _config(resume_partial=True)
    cfg.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
    out = _train(cfg, workdir)
    assert out["start_step"] == STEPS
    partial = [line for line in out["log"] if line.startswith("resumed partially")]
    assert partial and "restored" in partial[0] and "initialised" in partial[0], out["log"]
    assert "multi_modal_projector" in partial[0] and "language_model" in partial[0]

    got, before = _flat(out["state"].params), _flat(first["state"].params)
    # The LLM was frozen at its seeded initialisation in the first run: a fresh run's value.
    fresh = _flat(first["final_params"])
    for k, v in got.items():
        want = before[k] if k.startswith("multi_modal_projector/") else fresh[k]
        assert np.array_equal(v, want), k
    # The projector's Adam moments come from the checkpoint, the LLM's start at zero.
    mu = _flat(out["state"].opt_state[1].inner_states["default"].inner_state[0].mu)
    mu_before = _flat(first["state"].opt_state[1].inner_states["default"].inner_state[0].mu)
    for k, v in mu.items():
        if k.startswith("multi_modal_projector/"):
            assert np.array_equal(v, mu_before[k]) and np.any(v != 0), k
        else:
            assert not np.any(v), k


def test_fields_added_by_a_newer_version_are_logged_not_refused():
    from mllm_jax.train.checkpoints import check_resume_config, config_json
    cfg = _config()
    saved = config_json(cfg)
    del saved["stage"]["frozen_dtype"]  # a field this checkpoint's version did not have
    saved["data"]["retired_option"] = 1
    lines = []
    assert check_resume_config(saved, cfg, "checkpoint step 2", log=lines.append) is False
    assert "stage.frozen_dtype ((absent) in the checkpoint, '' now)" in lines[0]
    assert "data.retired_option (1 in the checkpoint, (absent) now)" in lines[0]
