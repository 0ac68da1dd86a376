"""The training loop reads device values only at its boundaries (log steps, checkpoint
steps, the last step, a stop): one read per `log_every` steps, counted by `loop.HostSyncs`,
which sees every host read of a jax.Array and lists any made outside the loop's own reads.
The NaN guard is read at those boundaries too, and a single process still stops at the step
a signal arrives in.

Tiny LLaVA stage 1 on one device, a batch of 4 with 8 text tokens: a run is a few seconds.
"""
import os
import signal

import jax
import numpy as np
import pytest

from configs import llava15_tiny_stage1
from mllm_jax.train import loop


def _config(**train):
    c = llava15_tiny_stage1.get_config()
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.train.update(global_batch_size=4, num_steps=6, log_every=3, checkpoint_every=1000,
                   async_checkpointing=False, export_final=False, lr=1e-3, warmup_ratio=0.0)
    c.train.update(**train)
    c.data.text_len = 8
    return c


def _train(cfg, workdir, **kw):
    lines = []
    out = loop.train(cfg, str(workdir), log=lines.append, devices=jax.devices()[:1], **kw)
    out["log"] = lines
    return out


def test_one_read_per_log_every_steps(tmp_path):
    calls = []
    with loop.HostSyncs() as syncs:
        out = _train(_config(), tmp_path, on_step=lambda step, m: calls.append((step, m)))
    # 6 steps logged every 3: the metrics are read after step 3 and after step 6, nothing
    # in between.
    assert syncs.steps == [3, 6] and syncs.stray == []
    assert out["step"] == 6 and len(out["losses"]) == 6 and np.all(np.isfinite(out["losses"]))
    # on_step still sees every step, in order, with its own metrics.
    assert [s for s, _ in calls] == [1, 2, 3, 4, 5, 6]
    assert [float(m["loss"]) for _, m in calls] == out["losses"]
    assert len(out["losses"]) == len(set(out["losses"]))  # six different steps
    assert sum(line.startswith("step ") for line in out["log"]) == 2


def test_a_per_step_read_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a loop that reads each step's loss right after the step
    (as the loop did before it kept metrics on the devices) shows six stray reads."""
    step = loop._StepLoop.step

    def reads_every_step(self, state):
        state = step(self, state)
        float(self.pending[-1]["loss"])
        return state

    monkeypatch.setattr(loop._StepLoop, "step", reads_every_step)
    with loop.HostSyncs() as syncs:
        _train(_config(), tmp_path)
    assert syncs.stray == [(s, "float32[]") for s in range(1, 7)]


def test_nan_streak_is_seen_at_the_next_boundary(tmp_path):
    # Steps 2 and 3 are NaN (a streak of 2 = max_nan_streak at step 3); the boundary after
    # it is step 4 (a log and checkpoint step), whose checkpoint is not saved: the run
    # stops as it would have at step 3.
    cfg = _config(num_steps=8, log_every=4, checkpoint_every=4, max_nan_streak=2)
    cfg.data.nan_batches = [1, 2]
    with loop.HostSyncs() as syncs, pytest.raises(loop.TrainingStopped) as err:
        _train(cfg, tmp_path)
    msg = str(err.value)
    assert syncs.steps == [4] and syncs.stray == []
    assert "2 steps in a row" in msg and "(at step 3; seen at step 4" in msg, msg
    assert "No checkpoint is in" in msg, msg
    assert not os.path.exists(tmp_path / "checkpoints" / "4")


def test_signal_stops_one_process_between_boundaries(tmp_path, monkeypatch):
    # A SIGTERM during step 2 (log_every 3, no checkpoint due): a single process stops
    # after step 2 with a checkpoint, without waiting for step 3.
    step = loop._StepLoop.step
    done = []

    def signalled_in_step_2(self, state):
        state = step(self, state)
        done.append(1)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return state

    monkeypatch.setattr(loop._StepLoop, "step", signalled_in_step_2)
    with loop.HostSyncs() as syncs:
        out = _train(_config(), tmp_path)
    assert out["stopped_at"] == 2 and out["step"] == 2 and len(out["losses"]) == 2
    assert syncs.steps == [2] and syncs.stray == []
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert f"signal {int(signal.SIGTERM)}: checkpointed step 2 in " \
        f"{tmp_path / 'checkpoints'}" in out["log"]
