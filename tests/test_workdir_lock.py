"""One trainer per workdir: a second trainer on a workdir in use refuses to start (exit 1,
naming the workdir and the holder) and the first finishes unharmed with its own final
parameters; a stale lock (its process gone) on this host is taken over; a lock from another
host is refused with how to remove it; the lock goes when training ends, also by an error."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from compile_flags import xla_flags

from mllm_jax.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "llava15_tiny_stage1.py")
LOCK = "train.lock"


def cli_train(workdir, *overrides):
    return main(["train", "--config", CONFIG, "--workdir", str(workdir),
                 *[f"--config.{o}" for o in overrides]])


def test_a_second_trainer_on_a_workdir_in_use_refuses_and_the_first_finishes_unharmed(
        tmp_path, capsys):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    params = tmp_path / "first.npz"
    go = tmp_path / "go"  # the first trainer waits after step 1 until this exists
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.train_worker", "--config", CONFIG, "--workdir",
         str(workdir), "--set=train.num_steps=3", "--set=train.checkpoint_every=1",
         "--pause-after-step", "1", "--resume-when", str(go), "--params-out", str(params)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in first.stdout:  # until the first trainer has run a step
            lines.append(line)
            if line.startswith("STEP "):
                break
        assert first.poll() is None, "".join(lines)
        held = json.loads((workdir / LOCK).read_text())
        assert held["pid"] == first.pid and held["host"] == socket.gethostname()

        code = cli_train(workdir, "train.num_steps=2", "train.lr=0.5")
        err = capsys.readouterr().err
        assert code == 1, err
        assert err.startswith(f"mllm-jax train: error: workdir {workdir} is in use by another "
                              f"trainer (pid {first.pid} on host {socket.gethostname()!r}, "
                              "started "), err
        assert "train_worker" in err and f"kill {first.pid}" in err, err
        assert "use another --workdir" in err and "Traceback" not in err
        assert json.loads((workdir / LOCK).read_text()) == held  # still the first's
        assert first.poll() is None  # refused while the first was still running

        go.touch()
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    lines.append(out)
    assert first.returncode == 0, "".join(lines)
    result = json.loads(next(x for x in "".join(lines).splitlines()
                             if x.startswith("RESULT "))[7:])
    assert result["start_step"] == 0 and result["step"] == 3  # never resumed or disturbed
    assert not (workdir / LOCK).exists()  # released at the end
    # final/ holds the first trainer's parameters, bit for bit.
    from mllm_jax.convert import load_orbax
    _, final = load_orbax(str(workdir / "final"))
    import flax
    final = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(final, sep="/").items()}
    with np.load(params) as f:
        assert sorted(f.files) == sorted(final)
        assert all(np.array_equal(f[k], final[k]) for k in f.files)


def killed_holder(workdir):
    """The lock a trainer leaves when killed with kill -9: a process takes it, then dies."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mllm_jax.train.workdir import acquire; "
         "acquire(sys.argv[1], command='mllm-jax train (killed)'); print('locked', "
         "flush=True); time.sleep(600)", str(workdir)],
        env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # SIGKILL: nothing runs on the way out
    holder.wait()
    return json.loads((workdir / LOCK).read_text())


def test_a_stale_lock_on_this_host_is_taken_over_and_each_run_releases_it(tmp_path, capsys):
    workdir = tmp_path / "run"
    stale = killed_holder(workdir)
    assert stale["host"] == socket.gethostname()
    assert cli_train(workdir, "train.num_steps=1") == 0
    out = capsys.readouterr().out
    assert (f"taking over the stale lock {workdir / LOCK}: its trainer (pid {stale['pid']} on "
            f"host {socket.gethostname()!r}, started {stale['started']}, ") in out, out
    assert "command: mllm-jax train (killed)) no longer runs" in out, out
    assert "finished 1 steps" in out and not (workdir / LOCK).exists()
    # Runs in sequence on one workdir (a restart, as after a preemption) still work.
    assert cli_train(workdir, "train.num_steps=1") == 0
    assert "resumed from" in capsys.readouterr().out and not (workdir / LOCK).exists()


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    info = {"host": "gpu-node-7", "pid": os.getpid(), "started": "2026-01-01 00:00:00 UTC",
            "started_unix": time.time() - 7200, "command": "mllm-jax train ..."}
    (workdir / LOCK).write_text(json.dumps(info))
    assert cli_train(workdir) == 1
    err = capsys.readouterr().err
    assert (f"workdir {workdir} is in use by another trainer (pid {os.getpid()} on host "
            "'gpu-node-7', started 2026-01-01 00:00:00 UTC, 2.0 h ago") in err, err
    assert (f"If host 'gpu-node-7' is gone or that trainer no longer runs, remove "
            f"{workdir / LOCK} and run again.") in err
    assert json.loads((workdir / LOCK).read_text()) == info  # left alone
    assert os.listdir(workdir) == [LOCK]  # nothing else written


@pytest.mark.parametrize("content", ["", "{not json"])
def test_an_unreadable_lock_is_refused_naming_the_file(tmp_path, capsys, content):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK).write_text(content)
    assert cli_train(workdir) == 1
    err = capsys.readouterr().err
    assert f"{workdir / LOCK} exists but cannot be read" in err, err
    assert f"remove {workdir / LOCK} and run again" in err


def test_the_lock_is_released_when_training_fails(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli_train(workdir, f"init.hf_checkpoint={tmp_path / 'missing'}") == 1
    assert "missing" in capsys.readouterr().err
    assert workdir.is_dir() and not (workdir / LOCK).exists()
