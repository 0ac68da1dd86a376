"""The trainer, top to bottom: mesh -> model -> parameters -> trainable/frozen split ->
optimizer -> (resume) -> steps with checkpoints, NaN guard and logging -> final export.

`train(cfg, workdir)` is what `mllm-jax train` runs; the config layout is documented in
`configs/llava15_tiny_stage1.py`.
"""
import contextlib
import dataclasses
import json
import os
import signal
import time
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import sharding
from mllm_jax.convert import integrity
from mllm_jax.convert.hf_io import abbreviate
from mllm_jax.data.sources import make_data
from mllm_jax.models import build_model, registry
from mllm_jax.train import flops as flops_lib
from mllm_jax.train import partition, step as step_lib
from mllm_jax.train.checkpoints import Checkpoints
from mllm_jax.train.objectives import Objective, make_objective
from mllm_jax.train.optimizer import make_optimizer


class TrainingStopped(RuntimeError):
    """Raised when the NaN guard stops a run."""


def maybe_initialize_distributed(cfg):
    d = cfg.get("distributed")
    if not d or not d.get("enabled") or jax.distributed.is_initialized():
        return
    if d.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kw = {k: d[k] for k in ("coordinator_address", "num_processes", "process_id")
          if d.get(k) is not None}
    if d.get("local_device_ids") is not None:
        kw["local_device_ids"] = list(d.local_device_ids)
    jax.distributed.initialize(**kw)


def abstract_boxed_params(model, mcfg, seed):
    return jax.eval_shape(model.init, jax.random.PRNGKey(seed),
                          *registry.init_inputs(mcfg))["params"]


def initial_params(cfg, model, boxed, shardings):
    """Parameters from `cfg.init`: an HF directory, an orbax export, or random (seeded)."""
    init = cfg.init
    flat_sh = shardings
    if init.get("hf_checkpoint"):
        from mllm_jax.convert import load_hf
        _, params = load_hf(init.hf_checkpoint, dtype=cfg.model.param_dtype,
                            scan_layers=cfg.model.scan_layers, shardings=flat_sh)
        return params
    if init.get("orbax_checkpoint"):
        from mllm_jax.convert.orbax_io import load_orbax
        _, params = load_orbax(init.orbax_checkpoint, shardings=flat_sh)
        return params
    inputs = registry.init_inputs(cfg.model)
    init_fn = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, *inputs)["params"]),
                      out_shardings=flat_sh)
    return init_fn(jax.random.PRNGKey(init.seed))


def _flat_select(tree, reference):
    """The subtree of `tree` with the same paths as `reference` (a dict tree)."""
    import flax
    flat = flax.traverse_util.flatten_dict(tree)
    ref = flax.traverse_util.flatten_dict(reference)
    return flax.traverse_util.unflatten_dict({k: flat[k] for k in ref})


def state_shardings(tx, boxed_trainable, mesh, rules, rng):
    """Shardings of the TrainState: optimizer moments inherit their parameter's axes."""
    abstract = jax.eval_shape(lambda r: step_lib.init_state(boxed_trainable, tx, r), rng)
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)
    sh = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return sh


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self) -> bool:
        """Whether any process was signalled. Every process calls this at every step
        boundary: a signal usually reaches the hosts of a pod at different steps, and a host
        that stopped (its checkpoint save is collective) while the others ran on would hang."""
        mine = self.signum is not None
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(mine))))


def _shardings_of(tree):
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying the given shardings."""
    return jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


@dataclasses.dataclass
class Trainer:
    """What `train` builds before its first step: mesh, model, objective, optimizer, the
    trainable state and the frozen trees (placed on the mesh, or, from
    `build_trainer(abstract=True)`, `jax.ShapeDtypeStruct`s carrying their shardings), and
    the step function. Tests and benchmarks drive it directly to inspect, lower, compile or
    time a step without the loop."""

    cfg: Any
    mesh: jax.sharding.Mesh
    rules: Any
    model: nn.Module
    objective: Objective
    tx: Any  # optax.GradientTransformation
    schedules: dict  # lr group -> schedule
    state: step_lib.TrainState | None
    state_shardings: Any
    frozen: Any  # frozen parameters (no gradient, no optimizer state)
    frozen_extra: Any  # the objective's frozen trees, e.g. {"ref": ...} for DPO
    step_fn: Callable  # step(state, frozen, frozen_extra, batch) -> (state, metrics)

    def context(self, tracing=False):
        """The mesh and the rules table. `tracing=True` (inside the jitted step) also makes
        the mesh the abstract mesh of the trace, under which the models' logical sharding
        constraints (`nn.with_logical_constraint`) take effect."""
        stack = contextlib.ExitStack()
        if tracing:
            stack.enter_context(jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh))
        else:
            stack.enter_context(self.mesh)
        stack.enter_context(sharding.activation_rules_context(self.rules))
        return stack

    def batch_shardings(self, local_batch) -> dict:
        return {k: sharding.batch_sharding(self.mesh, len(np.shape(v)))
                for k, v in local_batch.items()}

    def global_batch(self, local_batch) -> dict:
        """This process's rows of a batch -> global arrays sharded over (data, fsdp)."""
        sh = self.batch_shardings(local_batch)
        return {k: jax.make_array_from_process_local_data(sh[k], v)
                for k, v in local_batch.items()}

    def abstract_batch(self, global_batch) -> dict:
        """ShapeDtypeStructs (with their shardings) of a global batch shaped like
        `global_batch` (arrays or ShapeDtypeStructs), for lowering a step."""
        sh = self.batch_shardings(global_batch)
        return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=sh[k])
                for k, v in global_batch.items()}

    def jit_step(self, local_batch):
        """The jitted step for batches shaped like `local_batch`; it donates the state."""
        def step(state, frozen, frozen_extra, batch):
            with self.context(tracing=True):  # constraints are resolved while tracing
                return self.step_fn(state, frozen, frozen_extra, batch)

        return jax.jit(step, in_shardings=(self.state_shardings, _shardings_of(self.frozen),
                                           _shardings_of(self.frozen_extra),
                                           self.batch_shardings(local_batch)),
                       out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                       donate_argnums=(0,))


def build_trainer(cfg, *, devices=None, params=None, abstract=False) -> Trainer:
    """Mesh -> model -> parameters -> trainable/frozen split -> objective -> optimizer ->
    state.

    devices: the devices to build the mesh from (default: all of them, `jax.devices()`);
      with `abstract=True` any devices, attached or not (e.g. a TPU topology's).
    params: a full parameter tree to start from instead of the one `cfg.init` names.
    abstract: build everything from shapes and shardings alone, placing nothing on a
      device: state, frozen trees and the objective's extras are `jax.ShapeDtypeStruct`s
      with their shardings, so a step can be lowered and compiled ahead of time
      (`trainer.jit_step(batch).lower(trainer.state, ...)`).
    """
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.rules_from(cfg)
    model = build_model(cfg.model)
    tc = cfg.train
    objective = make_objective(cfg.stage, tc.loss_chunk)
    frozen_dtype = jnp.dtype(cfg.stage.frozen_dtype) if cfg.stage.frozen_dtype else None
    # The RNG of the state; in the abstract trainer only its shape (nothing is placed).
    rng = (jax.eval_shape(jax.random.PRNGKey, tc.seed) if abstract
           else jax.random.PRNGKey(tc.seed))

    with mesh, sharding.activation_rules_context(rules):
        boxed = abstract_boxed_params(model, cfg.model, cfg.init.seed)
        param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        if abstract:
            params = _abstract(nn.meta.unbox(boxed), param_sh)
        elif params is None:
            params = initial_params(cfg, model, boxed, param_sh)
        else:
            params = jax.device_put(params, param_sh)
        trainable, frozen = partition.split(params, cfg.stage.trainable)
        objective.check(partition.paths(trainable))
        trainable_boxed = _flat_select(boxed, trainable)
        tx, schedules = make_optimizer(tc, nn.meta.unbox(trainable_boxed), int(tc.num_steps))
        st_sh = state_shardings(tx, trainable_boxed, mesh, rules, rng)
        if abstract:
            frozen = _abstract(jax.eval_shape(partial(partition.cast_floating,
                                                      dtype=frozen_dtype), frozen),
                               _shardings_of(frozen))
            extra = jax.eval_shape(lambda p: objective.setup(p, frozen_dtype), params)
            frozen_extra = _abstract(extra, _extra_shardings(extra, param_sh, mesh))
            state = _abstract(jax.eval_shape(lambda p, r: step_lib.init_state(p, tx, r),
                                             trainable, rng), st_sh)
        else:
            frozen = partition.cast_floating(frozen, frozen_dtype)
            frozen_extra = objective.setup(params, frozen_dtype)
            del params
            trainable = jax.device_put(trainable, st_sh.params)
            state = jax.jit(lambda p: step_lib.init_state(p, tx, rng),
                            out_shardings=st_sh)(trainable)
        del trainable

    step_fn = step_lib.make_train_step(model, objective.loss, tx, tc.micro_batches,
                                       uses_rng=objective.uses_rng,
                                       project=objective.project)
    return Trainer(cfg=cfg, mesh=mesh, rules=rules, model=model, objective=objective, tx=tx,
                   schedules=schedules, state=state, state_shardings=st_sh, frozen=frozen,
                   frozen_extra=frozen_extra, step_fn=step_fn)


def _extra_shardings(extra, param_sh, mesh):
    """A frozen extra's leaf is sharded like the parameter at the end of its path (DPO's
    `ref/...` like the parameters), or replicated."""
    import flax
    flat_sh = flax.traverse_util.flatten_dict(param_sh)
    flat = flax.traverse_util.flatten_dict(extra) if extra else {}
    out = {k: flat_sh.get(k[1:], sharding.replicated(mesh)) for k in flat}
    return flax.traverse_util.unflatten_dict(out) if out else {}


def train(cfg, workdir: str, *, log=print, on_step=None, devices=None) -> dict:
    """Runs (or resumes) training. Returns a summary dict; writes checkpoints, TensorBoard
    scalars and the final parameters under workdir.

    on_step: optional `on_step(step, metrics)` called after every step (its checkpoint save
      requested and its log line written) with the 1-based step number and the step's
      metrics as host values; a stop signal received meanwhile is honoured at this boundary.
    devices: the devices to build the mesh from (default: all of them, `jax.devices()`).

    The config's values, and the mesh against the devices and the batch, are checked first
    (`train.validate`); the workdir is locked (`train.workdir`) while the run lasts, so a
    second trainer on it refuses to start.
    """
    from mllm_jax.train import validate
    from mllm_jax.train.workdir import holds_lock, locked
    validate.check(cfg)
    maybe_initialize_distributed(cfg)  # before jax.devices(): then it lists every host's
    validate.check_devices(cfg, len(devices if devices is not None else jax.devices()))
    holder = holds_lock(cfg)
    if holder is None:
        log("distributed.process_id is not set: the workdir lock is not taken")
    with locked(workdir, log=log) if holder else contextlib.nullcontext():
        return _train_locked(cfg, workdir, log=log, on_step=on_step, devices=devices)


def _train_locked(cfg, workdir: str, *, log=print, on_step=None, devices=None) -> dict:
    """`train` once the config is checked, JAX is initialised and the workdir is locked."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    ckpts = Checkpoints(workdir, cfg.train, log=log)
    ckpts.check_config(cfg)  # an incompatible resume is refused before anything is built
    trainer = build_trainer(cfg, devices=devices)
    model, st_sh = trainer.model, trainer.state_shardings
    frozen, frozen_extra, schedules = trainer.frozen, trainer.frozen_extra, trainer.schedules
    state, trainer.state = trainer.state, None  # the loop owns (and donates) it from here on
    tc = cfg.train
    total_steps = int(tc.num_steps)

    with trainer.context():
        data = make_data(cfg, jax.process_index(), jax.process_count(), workdir,
                         trainer.objective)
        ckpt_dir = ckpts.directory
        start = 0
        if ckpts.latest_step() is not None:
            state, frozen, start = _resume(ckpts, cfg, state, st_sh, frozen, data, log)

        jit_step = None  # built for the first batch's shapes

        tb = _tensorboard(workdir) if jax.process_index() == 0 else None
        flops_step = flops_lib.train_step_flops(
            cfg.model, tc.global_batch_size, getattr(data, "seq_len", 0),
            cfg.data.images, state.params)
        summary = {"start_step": start, "losses": [], "nan_skipped": 0}
        t_last, steps_since = time.time(), 0
        tokens_since = 0
        max_streak = tc.max_nan_streak
        every = tc.checkpoint_every
        with _StopFlag() as stop:
            for i in range(start, total_steps):
                local = next(data)
                if jit_step is None:
                    jit_step = trainer.jit_step(local)
                batch = trainer.global_batch(local)
                state, metrics = jit_step(state, frozen, frozen_extra, batch)
                m = jax.device_get(metrics)
                summary["losses"].append(float(m["loss"]))
                steps_since += 1
                tokens_since += int(np.sum(local.get("attention_mask",
                                                     local.get("chosen_attention_mask", 0))))
                streak = int(jax.device_get(state.nan_streak))
                step_no = i + 1
                if step_no % every == 0:  # orbax alone would also save the first step
                    ckpts.save(step_no, state, data.get_state(), cfg)
                if streak >= max_streak:
                    ckpts.wait_until_finished()
                    # Skipped steps leave the parameters as they were: any checkpoint holds
                    # the last good ones.
                    newest = ckpts.latest_step()
                    where = (f"The newest complete checkpoint in {ckpt_dir} (step {newest}) "
                             "holds the last good parameters." if newest is not None else
                             f"No checkpoint is in {ckpt_dir} yet (checkpoint_every={every}).")
                    raise TrainingStopped(
                        f"{streak} steps in a row had a non-finite loss or gradient (at step "
                        f"{step_no}); stopping. {where}")
                if step_no % tc.log_every == 0 or step_no == total_steps:
                    dt = time.time() - t_last
                    tok_s = tokens_since * jax.process_count() / max(dt, 1e-9)
                    lr = float(schedules["default"](step_no))
                    eta = (total_steps - step_no) * dt / max(steps_since, 1)
                    skipped = int(jax.device_get(state.nan_skipped))
                    log(f"step {step_no}/{total_steps} loss {m['loss']:.4f} lr {lr:.3g} "
                        f"grad_norm {m['grad_norm']:.3g} tokens/s {tok_s:,.0f} "
                        f"skipped {skipped} ETA {eta:.0f}s")
                    if tb is not None:
                        tb.add_scalar("train/loss", float(m["loss"]), step_no)
                        tb.add_scalar("train/grad_norm", float(m["grad_norm"]), step_no)
                        tb.add_scalar("train/lr", lr, step_no)
                        tb.add_scalar("train/tokens_per_s", tok_s, step_no)
                        tb.add_scalar("train/skipped_updates", skipped, step_no)
                        tb.add_scalar("train/model_flops_per_step", flops_step, step_no)
                        tb.flush()
                    t_last, steps_since, tokens_since = time.time(), 0, 0
                if on_step is not None:
                    on_step(step_no, m)
                if stop.agreed():
                    # A step that hit checkpoint_every was saved above; saving it again
                    # raises StepAlreadyExistsError.
                    if ckpts.latest_step() != step_no:
                        ckpts.save(step_no, state, data.get_state(), cfg)
                    ckpts.wait_until_finished()
                    why = (f"signal {stop.signum}" if stop.signum is not None
                           else "another process was signalled")
                    if not ckpts.committed_step(step_no):
                        raise RuntimeError(
                            f"{why}: the checkpoint of step {step_no} is not in {ckpt_dir} "
                            "after saving it; the steps since the last checkpoint are lost")
                    log(f"{why}: checkpointed step {step_no} in {ckpt_dir}")
                    summary.update(stopped_at=step_no, signal=stop.signum)
                    return _finish(summary, state, tb)
            if ckpts.latest_step() != total_steps and total_steps > start:
                ckpts.save(total_steps, state, data.get_state(), cfg)
            ckpts.wait_until_finished()
        final = partition.merge(state.params, frozen)
        if tc.export_final:
            from mllm_jax.convert.orbax_io import save_orbax
            # overwrite: a run restarted after it finished (e.g. preempted between this
            # export and exiting) resumes at the last step and exports the same parameters.
            save_orbax(model, final, os.path.join(workdir, "final"), overwrite=True)
            if cfg.data.source != "synthetic" and jax.process_index() == 0:
                # The conversation template the model was trained with, which generate,
                # chat and eval use by default (carried over by `convert orbax-to-hf`).
                from mllm_jax.infer.chat_template import write_chat_template
                write_chat_template(os.path.join(workdir, "final"), cfg.data.template)
        summary["final_params"] = final
        return _finish(summary, state, tb)


def _resume(ckpts, cfg, state, st_sh, frozen, data, log):
    """Restores the newest intact checkpoint into the fresh `state` (and, when
    `train.resume_partial` allows a changed `stage.trainable`, what matches into the state
    and the frozen tree). Returns (state, frozen, start step)."""
    abstract_state = _abstract(state, st_sh)
    fresh = {integrity.path_str(p): x
             for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    frozen_flat = {"params/" + integrity.path_str(p): x
                   for p, x in jax.tree_util.tree_flatten_with_path(frozen)[0]}

    def restore_leaf(path, meta):
        if path in fresh and tuple(fresh[path].shape) == tuple(meta.shape):
            return fresh[path]
        if path in frozen_flat and tuple(frozen_flat[path].shape) == tuple(meta.shape):
            return jax.ShapeDtypeStruct(meta.shape, meta.dtype,
                                        sharding=frozen_flat[path].sharding)
        return None

    out = ckpts.restore(abstract_state, cfg, restore_leaf=restore_leaf)
    if out is None:  # no step (the directory was emptied meanwhile)
        return state, frozen, 0
    if out["partial"]:
        got = out["restored_leaves"]
        paths = [integrity.path_str(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state)[0]]
        leaves = [got.get(p, x) for p, x in zip(paths, jax.tree_util.tree_leaves(state))]
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves)
        state = jax.device_put(state, st_sh)
        f_paths = list(frozen_flat)
        f_leaves = [got[p].astype(x.dtype) if p in got else x
                    for p, x in zip(f_paths, jax.tree_util.tree_leaves(frozen))]
        frozen = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(frozen),
                                              f_leaves)
        restored = sorted(p for p in paths if p in got) + sorted(
            p for p in f_paths if p in got)
        fresh_paths = sorted(p for p in paths if p not in got)
        log(f"resumed partially (train.resume_partial) from checkpoint step {out['step']}: "
            f"restored {len(restored)} arrays ({abbreviate(restored)}); initialised "
            f"{len(fresh_paths)} as a fresh run would ({abbreviate(fresh_paths)})")
    else:
        state = out["state"]
    data.set_state(out["data"])
    start = int(jax.device_get(state.step))
    log(f"resumed from {ckpts.directory} step {start}")
    return state, frozen, start


def _finish(summary, state, tb):
    summary["nan_skipped"] = int(jax.device_get(state.nan_skipped))
    summary["step"] = int(jax.device_get(state.step))
    summary["state"] = state
    if tb is not None:
        tb.close()
    return summary


def _tensorboard(workdir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # logging must never stop training
        return None
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
