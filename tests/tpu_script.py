"""Running a script that compiles for a TPU topology (libtpu installed, no TPU attached) in a
subprocess, and reading the JSON line it prints last."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tpu_script(script: str) -> dict:
    """JAX_PLATFORMS=cpu: the TPU runtime is not started (no TPU is attached); the topology
    alone is what the compiler needs. TPU_SKIP_MDS_QUERY: no cloud metadata look-up."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    return result
