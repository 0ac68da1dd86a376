"""Runs `mllm_jax.train.loop.train` in its own process, for the resume / multi-process tests.

    python -m tests.train_worker --config configs/llava15_tiny_stage2.py --workdir W \
        [--set train.num_steps=8 --set mesh.fsdp=2 ...] [--sleep-per-step S] \
        [--kill-after-step K [--kill-wait-for PATH]] [--stop-after-step K] [--params-out P.npz] \
        [--pause-after-step K --resume-when PATH] \
        [--coordinator 127.0.0.1:PORT --num-processes N --process-id I]

The caller sets XLA_FLAGS (simulated device count) and JAX_PLATFORMS. Output on stdout,
one line each, flushed:
  the trainer's own log lines ("step k/N loss ...", "resumed from ... step s", ...);
  `STEP {"step": k, "loss": ...}` after every step (losses as exact float reprs);
  `RESULT {...}` at the end: start_step, step, stopped_at, losses.
--kill-after-step K: SIGKILL this process right after step K; first, with --kill-wait-for
  PATH (relative to the workdir), wait until PATH exists (e.g. `checkpoints/3`: the async
  save of step 3 has been committed).
--pause-after-step K --resume-when PATH: after step K, wait until PATH (an absolute path the
  caller creates) exists, so the caller acts while the run is known to be between steps K
  and K+1 (a signal sent meanwhile is honoured at that boundary).
--stop-after-step K: send SIGTERM to this process after step K (in a multi-process run,
  signalling one process is enough: the trainer stops them all at the same step).
"""
import argparse
import ast
import importlib.util
import json
import os
import signal
import sys
import time


def _load_config(path, overrides):
    spec = importlib.util.spec_from_file_location("worker_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    flat = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        flat[key] = value
    cfg.update_from_flattened_dict(flat)
    return cfg


def _emit(tag, obj):
    print(f"{tag} {json.dumps(obj)}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sleep-per-step", type=float, default=0.0)
    ap.add_argument("--kill-after-step", type=int)
    ap.add_argument("--kill-wait-for")
    ap.add_argument("--stop-after-step", type=int)
    ap.add_argument("--pause-after-step", type=int)
    ap.add_argument("--resume-when")
    ap.add_argument("--params-out")
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    args = ap.parse_args(argv)

    # The repo root on sys.path, so `configs.common` imports from the config file.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    cfg = _load_config(args.config, args.set)
    if args.coordinator:
        cfg.distributed.update(enabled=True, coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               cpu_collectives="gloo")

    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from mllm_jax.train.loop import train

    def on_step(step, metrics):
        _emit("STEP", {"step": step, "loss": float(metrics["loss"])})
        if args.kill_after_step == step:
            if args.kill_wait_for:
                path = os.path.join(args.workdir, args.kill_wait_for)
                deadline = time.time() + 300
                while not os.path.exists(path) and time.time() < deadline:
                    time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        if args.stop_after_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        if args.pause_after_step == step:
            deadline = time.time() + 600
            while not os.path.exists(args.resume_when) and time.time() < deadline:
                time.sleep(0.05)
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)

    summary = train(cfg, args.workdir, log=lambda msg: print(msg, flush=True), on_step=on_step)

    if args.params_out and "final_params" in summary:
        import flax
        import numpy as np
        from jax.experimental import multihost_utils
        flat = flax.traverse_util.flatten_dict(summary["final_params"], sep="/")
        # Every process takes part in the gather (arrays span processes); process 0 writes.
        host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                for k, v in flat.items()}
        if jax.process_index() == 0:
            np.savez(args.params_out, **host)
    _emit("RESULT", {"start_step": summary["start_step"], "step": summary["step"],
                     "stopped_at": summary.get("stopped_at"), "losses": summary["losses"],
                     "process_index": jax.process_index(),
                     "process_count": jax.process_count()})


if __name__ == "__main__":
    main()
