"""Runs of `tests/train_worker.py` in their own processes (own simulated CPU devices, own
signals), for tests/test_resume.py and tests/test_resume_multiprocess.py."""
import json
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from compile_flags import xla_flags

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
        # Compiled as the test process compiles (compile_flags.py).
        env["XLA_FLAGS"] = xla_flags(devices)
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
