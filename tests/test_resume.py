"""Surviving preemption end to end in subprocesses.

Every run is `tests/train_worker.py` in its own process (its own simulated CPU devices, its
own signals) on the tiny LLaVA stage-2 recipe (projector + LLM trainable, async orbax
checkpoints):
  - SIGTERM mid-training checkpoints at the step boundary and exits cleanly; the resumed run
    ends with parameters bitwise equal to an uninterrupted run, with the same losses;
  - SIGKILL (between checkpoints, or while an async save is in flight) loses only the steps
    after the newest complete checkpoint; the resumed run again ends bitwise equal.
Multi-process training is in tests/test_resume_multiprocess.py (a file of its own, so that
`pytest -n 2 --dist loadfile` runs the two on different workers). The runs share a
persistent compilation cache, so only the first of each kind compiles.
"""
import os
import signal

import numpy as np
import pytest
from worker_runs import (CHECKPOINT_EVERY, STEPS, Run, assert_params_bitwise_equal,
                         complete_checkpoints, load_npz)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run: its per-step losses and final parameters."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    params = str(workdir) + ".npz"
    run = Run(workdir, "--params-out", params, cache_dir=cache_dir).finish()
    assert run.result["start_step"] == 0 and run.result["step"] == STEPS
    losses = [run.step_losses[s] for s in range(1, STEPS + 1)]
    assert all(np.isfinite(losses))
    return {"losses": losses, "params": load_npz(params)}


def test_sigterm_checkpoints_at_step_boundary_and_resumes_bitwise(tmp_path, reference,
                                                                  cache_dir):
    workdir = tmp_path / "run"
    # The run pauses after step 3 until `go` exists, so the signal lands at a known
    # boundary: after step 3, which is also a checkpoint_every step (the stop must not save
    # it twice).
    go = tmp_path / "go"
    run = Run(workdir, "--pause-after-step", 3, "--resume-when", go, cache_dir=cache_dir)
    run.wait_for_step(3)
    run.proc.send_signal(signal.SIGTERM)
    go.touch()
    run.finish()  # exit code 0: a clean stop, not death by signal
    stopped = run.result["stopped_at"]
    assert stopped == 3, run.describe()
    assert f"signal {int(signal.SIGTERM)}: checkpointed step {stopped} in " \
        f"{workdir / 'checkpoints'}" in run.lines, run.describe()
    assert complete_checkpoints(workdir)[-1] == stopped
    assert run.result["losses"] == reference["losses"][:stopped]

    params = str(tmp_path / "final.npz")
    resumed = Run(workdir, "--params-out", params, cache_dir=cache_dir).finish()
    assert resumed.result["start_step"] == stopped
    assert any(line.startswith("resumed from") and line.endswith(f"step {stopped}")
               for line in resumed.lines), resumed.describe()
    # Exactly the uninterrupted run's steps: same data position, same state, same RNG.
    assert resumed.result["losses"] == reference["losses"][stopped:]
    assert_params_bitwise_equal(load_npz(params), reference["params"])

    # Restarting a finished run (e.g. preempted after its final export) is a no-op.
    again = Run(workdir, cache_dir=cache_dir).finish()
    assert again.result["start_step"] == STEPS and again.result["losses"] == []


@pytest.mark.parametrize("moment", ["between_checkpoints", "during_async_save"])
def test_sigkill_resumes_from_last_complete_checkpoint_bitwise(tmp_path, reference, cache_dir,
                                                               moment):
    workdir = tmp_path / "run"
    if moment == "between_checkpoints":
        # After step 5, once the async save of step 3 has been committed: 4 and 5 are lost.
        kill = ["--kill-after-step", 5, "--kill-wait-for", f"checkpoints/{CHECKPOINT_EVERY}"]
    else:
        # Right after step 3's async save started: it may or may not be committed; a torn
        # one (a leftover tmp directory) must be ignored (and replaced when step 3 is saved
        # again).
        kill = ["--kill-after-step", CHECKPOINT_EVERY]
    run = Run(workdir, *kill, cache_dir=cache_dir).finish(expect_rc=-signal.SIGKILL)
    killed_at = max(run.step_losses)
    complete = complete_checkpoints(workdir)
    last = complete[-1] if complete else 0  # a torn first checkpoint: start over
    assert last <= killed_at, (complete, os.listdir(workdir / "checkpoints"))
    if moment == "between_checkpoints":
        assert (killed_at, last) == (5, CHECKPOINT_EVERY), (killed_at, complete)

    params = str(tmp_path / "final.npz")
    resumed = Run(workdir, "--params-out", params, cache_dir=cache_dir).finish()
    assert resumed.result["start_step"] == last, resumed.describe()
    assert resumed.result["losses"] == reference["losses"][last:]
    assert_params_bitwise_equal(load_npz(params), reference["params"])
    assert complete_checkpoints(workdir)[-1] == STEPS
