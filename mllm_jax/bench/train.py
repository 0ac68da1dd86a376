"""`mllm-jax bench train`: one training step of a preset, timed, next to the same step in
PyTorch/transformers on the same machine in the same run.

Prints one JSON line: step_time_s (median of the timed steps; _min_s the fastest),
tokens_per_s, model_flops_per_step (frozen towers
forward-only, see `train.flops`), the measured matmul peak, MFU against it, compile_s, the
training loop's own figures (`loop_run`: its host syncs per log_every steps, counted, and
its time per step) and the PyTorch figures with the ratio.
"""
import copy
import tempfile
import time

import jax
import numpy as np

from mllm_jax.bench.peak import matmul_peak
from mllm_jax.data.synthetic import SyntheticSource
from mllm_jax.train import flops as flops_lib
from mllm_jax.train import loop, recipe
from mllm_jax.models import registry
from mllm_jax.train.loop import build_trainer

STAGES = {1: [recipe.PROJECTOR], 2: [recipe.PROJECTOR, recipe.LLM]}


def bench_config(preset="llava-bench-small", stage=2, batch=4, text_len=256, dtype="float32"):
    c = recipe.base(preset)
    c.stage.trainable = STAGES[stage]
    c.model.dtype = dtype
    c.train.global_batch_size = batch
    c.train.num_steps = 1000
    c.train.warmup_ratio = 0.0
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.data.text_len = text_len - 1  # the BOS token counts as text
    return c


def loop_run(cfg, log_every: int, windows: int = 2, devices=None) -> dict:
    """The training loop itself (`train.loop.train`, synthetic data, a temporary workdir,
    checkpointed at its last step only) for `windows * log_every` steps, its host reads
    counted by `loop.HostSyncs`: host syncs per `log_every` steps, stray reads (a read of a
    device value between boundaries; 0 when the steps read nothing back) and its time per
    step between the first boundary (after the compile) and the last."""
    c = copy.deepcopy(cfg)
    steps = windows * log_every
    c.train.update(num_steps=steps, log_every=log_every, checkpoint_every=steps,
                   export_final=False, async_checkpointing=False)
    with tempfile.TemporaryDirectory() as workdir, loop.HostSyncs() as syncs:
        loop.train(c, workdir, log=lambda *_: None, devices=devices)
    timed = syncs.steps[-1] - syncs.steps[0]
    return {"loop_log_every": log_every, "loop_steps": steps,
            "host_syncs": len(syncs.steps),
            "host_syncs_per_log_every": round(len(syncs.steps) * log_every / steps, 3),
            "stray_host_reads": len(syncs.stray),
            "loop_step_time_s": round((syncs.times[-1] - syncs.times[0]) / timed, 4)
            if timed else None}


def run(preset="llava-bench-small", stage=2, batch=4, text_len=256, steps=5, warmup=2,
        torch_compare=True, dtype="float32", loop_windows=2) -> dict:
    """The figures of the module docstring. `loop_windows`: the loop runs that many times
    `steps` steps, logging every `steps` (0: skip it)."""
    cfg = bench_config(preset, stage, batch, text_len, dtype)
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    images = 1 if registry.is_multimodal(cfg.model) else 0
    data = SyntheticSource(cfg.model, batch, cfg.data.text_len,
                           images_per_sample=images)
    local = next(data)
    seq = local["input_ids"].shape[1]
    step = trainer.jit_step(local)
    batch_arrays = trainer.global_batch(local)
    t0 = time.perf_counter()
    compiled = step.lower(trainer.state, trainer.frozen, trainer.frozen_extra,
                          batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    state = trainer.state
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, trainer.frozen, trainer.frozen_extra, batch_arrays)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    step_min = float(np.min(times))
    flops = flops_lib.train_step_flops(cfg.model, batch, seq, images, state.params)
    peak = matmul_peak()
    out = {
        "preset": preset, "stage": stage, "batch": batch, "seq_len": seq, "dtype": dtype,
        "step_time_s": round(step_s, 4), "step_time_min_s": round(step_min, 4),
        "tokens_per_s": round(batch * seq / step_s, 1),
        "model_flops_per_step": flops, "matmul_peak_flops": round(peak["peak"]),
        "matmul_xla_flops": round(peak["xla"]),
        "matmul_torch_flops": peak["torch"] and round(peak["torch"]),
        "mfu": round(flops / step_s / peak["peak"], 4), "compile_s": round(compile_s, 2),
        "loss": float(metrics["loss"]),
    }
    del state, metrics, batch_arrays, compiled, trainer  # the loop builds its own
    if loop_windows:
        out.update(loop_run(cfg, steps, loop_windows, devices=jax.devices()[:1]))
    if torch_compare:
        from mllm_jax.bench import torch_reference
        model, opt = torch_reference.build(cfg.model, cfg.stage.trainable)
        t_times = torch_reference.time_steps(model, opt, local, steps, warmup=1)
        t_s, t_min = float(np.median(t_times)), float(np.min(t_times))
        out.update(torch_step_time_s=round(t_s, 4), torch_step_time_min_s=round(t_min, 4),
                   torch_tokens_per_s=round(batch * seq / t_s, 1),
                   speedup_vs_torch=round(t_s / step_s, 3),
                   speedup_vs_torch_best=round(t_min / step_min, 3))
    return out
