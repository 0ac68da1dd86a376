"""Multi-process training end to end in subprocesses (`tests/train_worker.py`, tiny LLaVA
stage 2): 2 processes x 2 devices (jax.distributed on 127.0.0.1, gloo) train like 1 process x
4 devices on the same (data=2, fsdp=2) mesh; a signal reaching one process stops both at the
same step with a collective checkpoint, and the pair resumes from it. The runs share a
persistent compilation cache, so only the first of each kind compiles.
"""
import socket

import numpy as np
import pytest
from worker_runs import Run, assert_params_bitwise_equal, complete_checkpoints, load_npz


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


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
