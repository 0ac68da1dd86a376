"""The trainer, top to bottom: mesh -> model -> parameters -> trainable/frozen split ->
optimizer -> (resume) -> steps with checkpoints, NaN guard and logging -> final export.

`train(cfg, workdir)` is what `mllm-jax train` runs; the config layout is documented in
`configs/llava15_tiny_stage1.py`.
"""
import contextlib
import dataclasses
import json
import signal
import time
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import sharding, storage
from mllm_jax.convert import integrity
from mllm_jax.convert.hf_io import abbreviate, unbox_shapes
from mllm_jax.data.sources import make_data
from mllm_jax.models import build_model, registry
from mllm_jax.train import flops as flops_lib
from mllm_jax.train import partition, step as step_lib
from mllm_jax.train.checkpoints import Checkpoints
from mllm_jax.train.host_syncs import HostSyncs, host_fetch, host_read
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
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at a step boundary.

    One process stops at the step it was signalled at (its flag is a host value: reading
    it costs no sync). Several processes must stop at the same step (the checkpoint save is
    collective: a host that stopped while the others ran on would hang), so they agree on
    their flags (`agreed`, one all-gather) only at the log and checkpoint boundaries, which
    every process reaches at the same steps. JAX's preemption service is asked at every step
    (`preempted`, a local check, as `multihost_utils.reached_preemption_sync_point` asks):
    it stops every process at the one step it agreed on for a notice it received. While
    the loop runs this flag takes SIGTERM/SIGINT in Python, so a signal reaches the loop
    here, not through that service."""

    def __init__(self):
        self.signum = None
        self._old = {}
        self._multi = jax.process_count() > 1

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

    def local(self) -> bool:
        """Whether this run may stop now on its own flag: one process, signalled."""
        return not self._multi and self.signum is not None

    def preempted(self, step: int) -> bool:
        """Whether JAX's preemption service agreed that every process stops at `step`
        (never with one process, or with the service off)."""
        if not self._multi:
            return False
        from jax.experimental import multihost_utils
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # jax_enable_preemption_service is off
            return False

    def agreed(self, step: int) -> bool:
        """Whether any process was signalled. With several processes every one of them
        calls this at the same boundaries (`step`): it is an all-gather."""
        mine = self.signum is not None
        if not self._multi:
            return mine
        from jax.experimental import multihost_utils
        return bool(np.any(host_read(
            lambda: multihost_utils.process_allgather(np.int32(mine)), step)))


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
            stack.enter_context(jax.set_mesh(self.mesh))
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

    # The abstract mesh only (not `jax.set_mesh`): the logical constraints apply while the
    # initialisation traces, and eager ops stay off the mesh's devices, which may be a TPU
    # topology's with `abstract=True`.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            sharding.activation_rules_context(rules):
        boxed = abstract_boxed_params(model, cfg.model, cfg.init.seed)
        param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        if abstract:
            params = _abstract(unbox_shapes(boxed), param_sh)
        elif params is None:
            params = initial_params(cfg, model, boxed, param_sh)
        else:
            params = jax.device_put(params, param_sh)
        trainable, frozen = partition.split(params, cfg.stage.trainable)
        objective.check(partition.paths(trainable))
        trainable_boxed = _flat_select(boxed, trainable)
        tx, schedules = make_optimizer(tc, unbox_shapes(trainable_boxed), int(tc.num_steps))
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

    on_step: optional `on_step(step, metrics)` called for every step with the 1-based step
      number and the step's metrics as host values. Metrics are read at boundaries only
      (every `log_every` steps, every checkpoint, the last step, a stop), so the calls come
      in order at each boundary, for the steps since the previous one, after its
      checkpoint save is requested and its log line written; a stop signal received
      meanwhile is honoured at this boundary.
    devices: the devices to build the mesh from (default: all of them, `jax.devices()`).

    SIGTERM or SIGINT makes the run save a checkpoint and return (`stopped_at`): one
    process after the step it arrives in, several processes together at the next log or
    checkpoint step (`_StopFlag`). Between those boundaries the loop reads nothing from
    the devices. A streak of `train.max_nan_streak` non-finite steps raises
    TrainingStopped at the boundary that sees it (`_StepLoop`).

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
    workdir = storage.absolute(workdir)  # a gs:// workdir stays as it is
    storage.makedirs(workdir)
    ckpts = Checkpoints(workdir, cfg.train, log=log)
    ckpts.check_config(cfg)  # an incompatible resume is refused before anything is built
    trainer = build_trainer(cfg, devices=devices)
    frozen = trainer.frozen
    state, trainer.state = trainer.state, None  # the loop owns (and donates) it from here on
    total_steps = int(cfg.train.num_steps)

    with trainer.context():
        data = make_data(cfg, jax.process_index(), jax.process_count(), workdir,
                         trainer.objective)
        start = 0
        if ckpts.latest_step() is not None:
            state, frozen, start = _resume(ckpts, cfg, state, trainer.state_shardings, frozen,
                                           data, log)
        tb = _tensorboard(workdir) if jax.process_index() == 0 else None
        summary = {"start_step": start, "losses": [], "nan_skipped": 0}
        steps = _StepLoop(trainer, frozen, ckpts, data, tb, state, summary, log=log,
                          on_step=on_step)
        with _StopFlag() as stop:
            state, stopped = steps.run(state, start, stop)
            if stopped:
                return _finish(summary, state, tb, steps.counters)
            if ckpts.latest_step() != total_steps and total_steps > start:
                ckpts.save(total_steps, state, data.get_state(), cfg)
            ckpts.wait_until_finished()
    # Exported outside the mesh context: under `jax.set_mesh`, unboxing the abstract
    # parameters the export checks against would apply sharding constraints to shapes.
    final = partition.merge(state.params, frozen)
    if cfg.train.export_final:
        from mllm_jax.convert.orbax_io import save_orbax
        # overwrite: a run restarted after it finished (e.g. preempted between this export
        # and exiting) resumes at the last step and exports the same parameters.
        save_orbax(trainer.model, final, storage.join(workdir, "final"), overwrite=True)
        if cfg.data.source != "synthetic" and jax.process_index() == 0:
            # The template trained with, generate/chat/eval's default (convert orbax-to-hf keeps it)
            from mllm_jax.infer.chat_template import write_chat_template
            write_chat_template(storage.join(workdir, "final"), cfg.data.template,
                                image_placement=cfg.data.get("image_placement", "as_written"))
    summary["final_params"] = final
    return _finish(summary, state, tb, steps.counters)


# Steps the host may dispatch ahead of the oldest unfinished one. Each dispatched step holds
# its batch in device memory, so an unbounded lead (a fast host, a long log_every) would fill
# it; waiting for the step this far back reads nothing and never idles the devices (the
# newer steps are queued behind it).
MAX_STEPS_AHEAD = 2


class _StepLoop:
    """The steps of a run. A step is dispatched, not waited for: its metrics stay on the
    devices until the next boundary (a log step, a checkpoint step, the last step, a stop),
    which reads them all at once (`host_fetch`: the run's one host sync per boundary), runs
    the NaN guard over them, saves the checkpoint, logs, calls `on_step` for each of those
    steps in order and honours a stop.

    The NaN guard lives in the step: a non-finite step skips its update on the device and
    counts the streak in the state (`step.make_train_step`), so the parameters never take
    a non-finite update. The host sees the streak at the boundary after it; the run then
    stops as it would have at the step the streak reached `max_nan_streak`: checkpoints of
    later steps are not saved, and the steps run meanwhile are dropped."""

    def __init__(self, trainer, frozen, ckpts, data, tb, state, summary, *, log, on_step):
        tc = trainer.cfg.train
        self.trainer, self.frozen, self.ckpts, self.data, self.tb = (trainer, frozen, ckpts,
                                                                     data, tb)
        self.summary, self.log, self.on_step = summary, log, on_step
        self.total, self.log_every = int(tc.num_steps), tc.log_every
        self.every, self.max_streak = tc.checkpoint_every, tc.max_nan_streak
        self.flops = flops_lib.train_step_flops(
            trainer.cfg.model, tc.global_batch_size, getattr(data, "seq_len", 0),
            trainer.cfg.data.images, state.params)
        self.jit_step = None  # built for the first batch's shapes
        self.pending = []  # the device metrics of the steps since the last boundary
        self.tokens, self.since, self.t_last = 0, 0, time.time()  # ... since the last log
        self.counters = None  # the state's step and nan_skipped at the last boundary
        self.stop = None

    def run(self, state, start: int, stop: _StopFlag):
        """Steps start+1 .. num_steps. Returns (state, whether a stop ended the run)."""
        self.stop = stop
        for step_no in range(start + 1, self.total + 1):
            with HostSyncs.region("steps", step_no):
                state = self.step(state)
                preempted = stop.preempted(step_no)
                if preempted or stop.local() or self.due(step_no):
                    if self.boundary(state, step_no, preempted):
                        return state, True
        return state, False

    def step(self, state):
        """Dispatches one step on the next batch; reads nothing back from the devices (it
        waits for the step MAX_STEPS_AHEAD back to finish)."""
        local = next(self.data)
        if self.jit_step is None:
            self.jit_step = self.trainer.jit_step(local)
        state, metrics = self.jit_step(state, self.frozen, self.trainer.frozen_extra,
                                       self.trainer.global_batch(local))
        self.pending.append(metrics)
        if len(self.pending) > MAX_STEPS_AHEAD:
            self.pending[-MAX_STEPS_AHEAD - 1]["loss"].block_until_ready()
        self.tokens += int(np.sum(local.get("attention_mask",
                                            local.get("chosen_attention_mask", 0))))
        self.since += 1
        return state

    def due(self, step_no: int) -> bool:
        """Whether `step_no` is a boundary on every process: a log, checkpoint or last
        step."""
        return (step_no % self.log_every == 0 or step_no % self.every == 0
                or step_no == self.total)

    def boundary(self, state, step_no: int, preempted: bool) -> bool:
        """Fetches, guards, saves, logs and calls back for the steps since the last
        boundary; returns whether the run stops here."""
        logging = step_no % self.log_every == 0 or step_no == self.total
        lr = self.trainer.schedules["default"](step_no) if logging else None
        host = host_fetch({"metrics": self.pending, "lr": lr, "step": state.step,
                            "nan_skipped": state.nan_skipped}, step_no)
        metrics, self.pending = host["metrics"], []
        first = step_no - len(metrics) + 1
        self.counters = {k: int(host[k]) for k in ("step", "nan_skipped")}
        self.summary["losses"].extend(float(m["loss"]) for m in metrics)
        tripped = next((first + k for k, m in enumerate(metrics)
                        if m["nan_streak"] >= self.max_streak), None)
        # Saved only when no streak ended the run before this step. Every checkpoint step
        # is a boundary (orbax alone would also save the first step).
        if step_no % self.every == 0 and tripped in (None, step_no):
            self._save(step_no, state)
        if tripped is not None:
            self._nan_stop(tripped, step_no, int(metrics[tripped - first]["nan_streak"]))
        if logging:
            self._log(step_no, metrics[-1], float(host["lr"]))
        if self.on_step is not None:
            for k, m in enumerate(metrics):
                self.on_step(first + k, m)
        if preempted or self.stop.agreed(step_no):
            self._stop(state, step_no, preempted)
            return True
        return False

    def _save(self, step_no: int, state):
        with HostSyncs.region("save"):
            self.ckpts.save(step_no, state, self.data.get_state(), self.trainer.cfg)

    def _nan_stop(self, step_no: int, seen_at: int, streak: int):
        self.ckpts.wait_until_finished()
        # Skipped steps leave the parameters as they were: any checkpoint holds the last
        # good ones.
        newest, ckpt_dir = self.ckpts.latest_step(), self.ckpts.directory
        where = (f"The newest complete checkpoint in {ckpt_dir} (step {newest}) holds the "
                 "last good parameters." if newest is not None else
                 f"No checkpoint is in {ckpt_dir} yet (checkpoint_every={self.every}).")
        seen = ("" if seen_at == step_no else
                f"; seen at step {seen_at}, the next log or checkpoint step")
        raise TrainingStopped(f"{streak} steps in a row had a non-finite loss or gradient (at "
                              f"step {step_no}{seen}); stopping. {where}")

    def _log(self, step_no: int, m: dict, lr: float):
        dt = time.time() - self.t_last
        tok_s = self.tokens * jax.process_count() / max(dt, 1e-9)
        eta = (self.total - step_no) * dt / max(self.since, 1)
        skipped = self.counters["nan_skipped"]
        self.log(f"step {step_no}/{self.total} loss {m['loss']:.4f} lr {lr:.3g} "
                 f"grad_norm {m['grad_norm']:.3g} tokens/s {tok_s:,.0f} "
                 f"skipped {skipped} ETA {eta:.0f}s")
        if self.tb is not None:
            for name, value in (("loss", float(m["loss"])), ("grad_norm", float(m["grad_norm"])),
                                ("lr", lr), ("tokens_per_s", tok_s),
                                ("skipped_updates", skipped),
                                ("model_flops_per_step", self.flops)):
                self.tb.add_scalar(f"train/{name}", value, step_no)
            self.tb.flush()
        self.t_last, self.since, self.tokens = time.time(), 0, 0

    def _stop(self, state, step_no: int, preempted: bool):
        ckpts, stop = self.ckpts, self.stop
        # A step that hit checkpoint_every was saved above; saving it again raises
        # StepAlreadyExistsError.
        if ckpts.latest_step() != step_no:
            self._save(step_no, state)
        ckpts.wait_until_finished()
        why = (f"signal {stop.signum}" if stop.signum is not None else
               "a preemption notice" if preempted else "another process was signalled")
        if not ckpts.committed_step(step_no):
            raise RuntimeError(
                f"{why}: the checkpoint of step {step_no} is not in {ckpts.directory} after "
                "saving it; the steps since the last checkpoint are lost")
        self.log(f"{why}: checkpointed step {step_no} in {ckpts.directory}")
        self.summary.update(stopped_at=step_no, signal=stop.signum)


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


def _finish(summary, state, tb, counters=None):
    """The summary of a run that ends with `state`; `counters`: the state's step and
    nan_skipped as the last boundary read them (read here when no step ran)."""
    counters = counters or {k: int(v) for k, v in jax.device_get(
        {"step": state.step, "nan_skipped": state.nan_skipped}).items()}
    summary.update(counters, state=state)
    if tb is not None:
        tb.close()
    return summary


def _tensorboard(workdir):
    """tensorboardX's writer (a gs:// logdir through google-cloud-storage), or None without
    either: logging must never stop training."""
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter(storage.join(workdir, "tensorboard"))
    except ImportError:
        return None


def write_json(path, obj):
    with storage.open_file(path, "w") as f:
        json.dump(obj, f, indent=2)
