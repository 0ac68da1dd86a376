"""Surviving preemption, and multi-process training, end to end in subprocesses.

Every run is `tests/train_worker.py` in its own process (its own simulated CPU devices, its
own signals) on the tiny LLaVA stage-2 recipe (projector + LLM trainable, async orbax
checkpoints):
  - SIGTERM mid-training checkpoints at the step boundary and exits cleanly; the resumed run
    ends with parameters bitwise equal to an uninterrupted run, with the same losses;
  - SIGKILL (between checkpoints, or while an async save is in flight) loses only the steps
    after the newest complete checkpoint; the resumed run again ends bitwise equal;
  - 2 processes x 2 devices (jax.distributed on 127.0.0.1, gloo) train like 1 process x 4
    devices on the same (data=2, fsdp=2) mesh; a signal reaching one process stops both at
    the same step with a collective checkpoint, and the pair resumes from it.
The runs share a persistent compilation cache, so only the first of each kind compiles.
"""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "llava15_tiny_stage2.py")
TIMEOUT = 600  # seconds per run; generous, CI has 2 busy cores
STEPS = 8
CHECKPOINT_EVERY = 3
# 2 devices, parameters and optimizer state sharded over fsdp: the restore re-shards them.
SINGLE = [f"train.num_steps={STEPS}", "train.log_every=1",
          f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.async_checkpointing=True",
          "mesh.data=1", "mesh.fsdp=2"]


class Run:
    """One `tests.train_worker` process; stdout is read line by line on a thread."""

    def __init__(self, workdir, *args, sets=SINGLE, devices=2, cache_dir=None):
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        if cache_dir:
            env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        self.workdir = str(workdir)
        cmd = [sys.executable, "-m", "tests.train_worker", "--config", CONFIG,
               "--workdir", self.workdir, *[f"--set={s}" for s in sets], *map(str, args)]
        self._stderr = open(os.path.join(os.path.dirname(self.workdir),
                                         f"{os.path.basename(self.workdir)}-{time.time_ns()}"
                                         ".stderr"), "w+")
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        self.lines, self._queue = [], queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def stderr(self):
        self._stderr.seek(0)
        return self._stderr.read()[-20000:]

    def describe(self):
        return (f"command: {self.proc.args}\nreturn code: {self.proc.poll()}\n--- stdout\n"
                + "\n".join(self.lines[-60:]) + f"\n--- stderr\n{self.stderr()}")

    def wait_for_step(self, k, timeout=TIMEOUT):
        deadline = time.time() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.time(), 0.01))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no step {k} within {timeout}s\n{self.describe()}")
            if line is None:
                self.finish()
                pytest.fail(f"the run ended before step {k}\n{self.describe()}")
            if line.startswith("STEP ") and json.loads(line[5:])["step"] >= k:
                return

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def finish(self, timeout=TIMEOUT, expect_rc=0):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not finish within {timeout}s\n{self.describe()}")
        self._reader.join(30)
        self.seconds = time.time() - self.started
        print(f"[{self.seconds:.1f}s] {' '.join(map(str, self.proc.args[3:]))}")
        if expect_rc is not None and self.proc.returncode != expect_rc:
            pytest.fail(f"return code {self.proc.returncode}, expected {expect_rc}\n"
                        + self.describe())
        return self

    @property
    def step_losses(self) -> dict:
        """{step: loss} of every step this process ran (also when it was killed)."""
        out = {}
        for line in self.lines:
            if line.startswith("STEP "):
                d = json.loads(line[5:])
                out[d["step"]] = d["loss"]
        return out

    @property
    def result(self) -> dict:
        found = [json.loads(line[7:]) for line in self.lines if line.startswith("RESULT ")]
        assert found, f"no RESULT line\n{self.describe()}"
        return found[-1]


def complete_checkpoints(workdir):
    """Steps with a committed checkpoint (orbax renames `<step>.orbax-checkpoint-tmp` into
    place when a save is complete)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_params_bitwise_equal(got, want):
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k].dtype != want[k].dtype
              or not np.array_equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} arrays differ, e.g. {differ[:5]}"


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
    # A pause after each step's STEP line, so the signal lands at a known boundary: after
    # step 3, which is also a checkpoint_every step (the stop must not save it twice).
    run = Run(workdir, "--sleep-per-step", 1.0, cache_dir=cache_dir)
    run.wait_for_step(3)
    run.proc.send_signal(signal.SIGTERM)
    run.finish()  # exit code 0: a clean stop, not death by signal
    stopped = run.result["stopped_at"]
    assert stopped is not None and 3 <= stopped < STEPS, run.describe()
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(workdir, sets, cache_dir, extra=((), ())):
    """Two processes x 2 devices on one coordinator; returns both runs, finished."""
    port = _free_port()
    runs = [Run(workdir, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                "--process-id", i, *extra[i], sets=sets, devices=2, cache_dir=cache_dir)
            for i in range(2)]
    try:
        for r in runs:
            r.finish()
    finally:  # a failed peer leaves the other waiting in a collective
        for r in runs:
            r.kill()
    return runs


def test_two_processes_match_one_process_and_checkpoint_together(tmp_path, cache_dir):
    steps = 4
    sets = [f"train.num_steps={steps}", "train.log_every=1", "train.checkpoint_every=100",
            "mesh.data=2", "mesh.fsdp=2"]
    one_params = str(tmp_path / "one.npz")
    one = Run(tmp_path / "one", "--params-out", one_params, sets=sets, devices=4,
              cache_dir=cache_dir).finish()
    assert one.result["process_count"] == 1

    workdir = tmp_path / "two"
    # Only process 0 is signalled (after step 2); both must stop there, save step 2
    # together (orbax saves are collective) and exit cleanly.
    first = _run_pair(workdir, sets, cache_dir, extra=(("--stop-after-step", 2), ()))
    for r in first:
        assert r.result["process_count"] == 2 and r.result["stopped_at"] == 2, r.describe()
    assert "another process was signalled: checkpointed step 2 in " \
        f"{workdir / 'checkpoints'}" in first[1].lines
    assert complete_checkpoints(workdir) == [2]

    two_params = str(tmp_path / "two.npz")
    second = _run_pair(workdir, sets, cache_dir, extra=(("--params-out", two_params), ()))
    for r in second:
        assert r.result["start_step"] == 2, r.describe()
    assert complete_checkpoints(workdir)[-1] == steps

    # Both processes see the same (replicated) losses, and they match the single process.
    for a, b in zip(first[0].result["losses"] + second[0].result["losses"],
                    first[1].result["losses"] + second[1].result["losses"]):
        assert a == b
    losses_two = first[0].result["losses"] + second[0].result["losses"]
    np.testing.assert_allclose(losses_two, one.result["losses"], rtol=0, atol=1e-5)

    two = load_npz(two_params)
    ref = load_npz(one_params)
    assert sorted(two) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(two[k], ref[k], rtol=0, atol=1e-5, err_msg=k)

    # The final export written by both processes together is complete and loads in one.
    import flax
    from mllm_jax.convert.orbax_io import load_orbax
    _, exported = load_orbax(workdir / "final")
    exported = flax.traverse_util.flatten_dict(exported, sep="/")
    assert_params_bitwise_equal({k: np.asarray(v) for k, v in exported.items()}, two)
