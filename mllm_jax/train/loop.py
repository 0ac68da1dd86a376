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
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mllm_jax import sharding
from mllm_jax.models import build_model
from mllm_jax.train import flops as flops_lib
from mllm_jax.train import partition, step as step_lib
from mllm_jax.train.optimizer import make_optimizer

OBJECTIVES = {"lm": step_lib.lm_objective, "dpo": step_lib.dpo_objective}


class TrainingStopped(RuntimeError):
    """Raised when the NaN guard stops a run."""


def maybe_initialize_distributed(cfg):
    d = cfg.get("distributed")
    if not d or not d.get("enabled"):
        return
    if d.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kw = {k: d[k] for k in ("coordinator_address", "num_processes", "process_id")
          if d.get(k) is not None}
    if d.get("local_device_ids") is not None:
        kw["local_device_ids"] = list(d.local_device_ids)
    jax.distributed.initialize(**kw)


def _dummy_inputs(mcfg):
    ids = jnp.zeros((1, 1), jnp.int32)
    return (ids,)


def abstract_boxed_params(model, mcfg, seed):
    return jax.eval_shape(model.init, jax.random.PRNGKey(seed), *_dummy_inputs(mcfg))["params"]


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
    init_fn = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, *_dummy_inputs(cfg.model))
                                                ["params"]), out_shardings=flat_sh)
    return init_fn(jax.random.PRNGKey(init.get("seed", 0)))


def _flat_select(tree, reference):
    """The subtree of `tree` with the same paths as `reference` (a dict tree)."""
    import flax
    flat = flax.traverse_util.flatten_dict(tree)
    ref = flax.traverse_util.flatten_dict(reference)
    return flax.traverse_util.unflatten_dict({k: flat[k] for k in ref})


def state_shardings(tx, boxed_trainable, mesh, rules, rng):
    """Shardings of the TrainState: optimizer moments inherit their parameter's axes."""
    abstract = jax.eval_shape(lambda: step_lib.init_state(boxed_trainable, tx, rng))
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)
    sh = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return sh


def trained_parts(cfg, trainable):
    keys = set(trainable)
    return {"vision": "vision_tower" in keys, "projector": "multi_modal_projector" in keys,
            "llm": "language_model" in keys or "model" in keys or "lm_head" in keys}


def make_data(cfg, process_index, process_count, workdir=None):
    """This process's batch iterator (with get_state/set_state) for `cfg.data.source`:
    `synthetic` (deterministic random batches), `llava_json` (a LLaVA-format JSON file and an
    image folder, through `data.pipeline.LlavaPipeline`) or `tfds` (a prepared
    `data.tfds_builders` dataset directory, `data.tfds_dir`, images read from memory).

    With stage.objective "dpo" the JSON file (or TFDS dataset) holds preference pairs
    {id, image, prompt, chosen, rejected} and the pipeline yields the DPO batch keys.
    A non-empty `data.mixture` ([{"json" or "tfds_dir", "image_root", "weight"}, ...]) mixes
    several such sources with `data.pipeline.MixturePipeline` (seeded by data.seed)."""
    d = cfg.data
    if d.source == "synthetic":
        from mllm_jax.data.synthetic import SyntheticSource
        return SyntheticSource(cfg.model, cfg.train.global_batch_size, d.text_len,
                               seed=d.get("seed", 0), images_per_sample=d.get("images", 1),
                               objective=cfg.stage.objective,
                               nan_batches=tuple(d.get("nan_batches") or ()),
                               distinct_batches=d.get("distinct_batches", 0),
                               process_index=process_index, process_count=process_count)
    if d.source in ("llava_json", "tfds"):
        return _llava_json_pipeline(cfg, process_index, process_count, workdir)
    raise ValueError(f"unknown data.source {d.source!r} (available: synthetic, llava_json, "
                     f"tfds)")


def _records(source, spec, objective):
    """The records of one data source: spec has "json" (+ "image_root") or "tfds_dir"."""
    if source == "tfds" or spec.get("tfds_dir"):
        from mllm_jax.data.tfds_builders import PreferenceRecord, records_from_tfds
        if not spec.get("tfds_dir"):
            raise ValueError("data.source=tfds needs data.tfds_dir (a prepared dataset "
                             "directory)")
        records = list(records_from_tfds(spec["tfds_dir"]))
        prefs = sum(isinstance(r, PreferenceRecord) for r in records)
        if records and (objective == "dpo") != (prefs == len(records)):
            raise ValueError(f"{spec['tfds_dir']}: stage.objective={objective} needs "
                             f"{'preference' if objective == 'dpo' else 'conversation'} "
                             f"records")
        return records
    if not spec.get("json"):
        raise ValueError(f"data.source={source} needs data.json (a path)")
    from mllm_jax.data.llava_json import read_llava_json, read_preference_json
    read = read_preference_json if objective == "dpo" else read_llava_json
    return read(spec["json"], spec.get("image_root") or None)


def _llava_json_pipeline(cfg, process_index, process_count, workdir):
    from mllm_jax.data import image as image_lib
    from mllm_jax.data.pipeline import LlavaPipeline, MixturePipeline
    from mllm_jax.data.tokenizer import load_tokenizer
    d, m = cfg.data, cfg.model
    objective = cfg.stage.objective
    if objective not in ("lm", "dpo"):
        raise ValueError(f"data.source={d.source} feeds the lm and dpo objectives, not "
                         f"{objective!r}")
    if not d.get("tokenizer"):
        raise ValueError(f"data.source={d.source} needs data.tokenizer (a path)")
    if d.get("processor"):
        image_cfg = image_lib.load_image_processor_config(d.processor,
                                                          mode=d.get("image_mode") or None)
    else:  # the model's own resolution with CLIP's mean/std
        v = m.vision
        image_cfg = image_lib.ImageProcessorConfig(
            mode=d.get("image_mode") or "crop", size={"shortest_edge": v.image_size},
            crop_size=v.image_size)
    grid = (m.vision.image_size // m.vision.patch_size) ** 2
    tokens = grid + (1 if m.vision_feature_select_strategy == "full" else 0)
    tokenizer = load_tokenizer(d.tokenizer)
    mixture = [dict(s) for s in (d.get("mixture") or [])]

    def pipeline(records, seed, **kw):
        return LlavaPipeline(
            records, tokenizer, image_cfg, d.get("template") or "vicuna_v1",
            max_length=d.max_length, max_images=d.get("images", 1),
            image_tokens_per_image=tokens, image_token_id=m.image_token_index, seed=seed,
            process_index=process_index, process_count=process_count,
            num_workers=d.get("workers", 4), workdir=workdir, mode=objective, **kw)

    seed = d.get("seed", 0)
    if mixture:
        # Each source its own order (seed + k) and report file (data_report.source{k}.*).
        sources = [(pipeline(_records(d.source, spec, objective), seed + k,
                             report_name=f"data_report.source{k}"),
                    float(spec.get("weight", 1.0))) for k, spec in enumerate(mixture)]
        pipe = MixturePipeline(sources, global_batch_size=cfg.train.global_batch_size,
                               seed=seed)
    else:
        spec = {"json": d.get("json"), "image_root": d.get("image_root"),
                "tfds_dir": d.get("tfds_dir") if d.source == "tfds" else ""}
        pipe = pipeline(_records(d.source, spec, objective), seed,
                        global_batch_size=cfg.train.global_batch_size)
    pipe.seq_len = d.max_length
    return pipe


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


@dataclasses.dataclass
class Trainer:
    """What `train` builds before its first step: mesh, model, optimizer, the trainable
    state and the frozen trees (placed on the mesh), and the step function. Tests and
    benchmarks drive it directly to inspect, lower or time a step without the loop."""

    cfg: Any
    mesh: jax.sharding.Mesh
    rules: Any
    model: nn.Module
    tx: Any  # optax.GradientTransformation
    schedules: dict  # lr group -> schedule
    state: step_lib.TrainState | None
    state_shardings: Any
    frozen: Any  # frozen parameters (no gradient, no optimizer state)
    frozen_extra: Any  # e.g. {"ref": reference parameters} for DPO
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
        return {k: sharding.batch_sharding(self.mesh, np.ndim(v)) for k, v in local_batch.items()}

    def global_batch(self, local_batch) -> dict:
        """This process's rows of a batch -> global arrays sharded over (data, fsdp)."""
        sh = self.batch_shardings(local_batch)
        return {k: jax.make_array_from_process_local_data(sh[k], v)
                for k, v in local_batch.items()}

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


def build_trainer(cfg, *, devices=None, params=None) -> Trainer:
    """Mesh -> model -> parameters -> trainable/frozen split -> optimizer -> state.

    devices: the devices to build the mesh from (default: all of them, `jax.devices()`).
    params: a full parameter tree to start from instead of the one `cfg.init` names.
    """
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.rules_from(cfg)
    model = build_model(cfg.model)
    tc = cfg.train
    total_steps = int(tc.num_steps)
    objective_name = cfg.stage.objective
    if objective_name not in OBJECTIVES:
        raise ValueError(f"unknown stage.objective {objective_name!r}; known: {list(OBJECTIVES)}")

    with mesh, sharding.activation_rules_context(rules):
        boxed = abstract_boxed_params(model, cfg.model, cfg.init.get("seed", 0))
        param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        if params is None:
            params = initial_params(cfg, model, boxed, param_sh)
        else:
            params = jax.device_put(params, param_sh)
        trainable, frozen = partition.split(params, cfg.stage.trainable)
        if objective_name == "dpo" and "vision_tower" in trainable:
            raise ValueError("DPO shares one vision-tower pass between policy and reference; "
                             "keep vision_tower frozen in stage.trainable")
        frozen_dtype = jnp.dtype(cfg.stage.frozen_dtype) if cfg.stage.get("frozen_dtype") else None
        frozen = partition.cast_floating(frozen, frozen_dtype)
        frozen_extra = {}
        if objective_name == "dpo":
            frozen_extra["ref"] = partition.cast_floating(params, frozen_dtype)
        del params
        trainable_boxed = _flat_select(boxed, trainable)
        tx, schedules = make_optimizer(cfg.optim, nn.meta.unbox(trainable_boxed), total_steps)
        rng = jax.random.PRNGKey(tc.get("seed", 0))
        st_sh = state_shardings(tx, trainable_boxed, mesh, rules, rng)
        trainable = jax.device_put(trainable, st_sh.params)
        state = jax.jit(lambda p: step_lib.init_state(p, tx, rng), out_shardings=st_sh)(trainable)
        del trainable

    objective = OBJECTIVES[objective_name]
    okw = dict(cfg.stage.get("objective_kwargs") or {})
    okw.setdefault("chunk_size", tc.get("loss_chunk", 2048))
    obj = lambda m, p, b, e: objective(m, p, b, e, **okw)  # noqa: E731
    step_fn = step_lib.make_train_step(model, obj, tx, tc.get("micro_batches", 1))
    return Trainer(cfg=cfg, mesh=mesh, rules=rules, model=model, tx=tx, schedules=schedules,
                   state=state, state_shardings=st_sh, frozen=frozen,
                   frozen_extra=frozen_extra, step_fn=step_fn)


def train(cfg, workdir: str, *, log=print, on_step=None, devices=None) -> dict:
    """Runs (or resumes) training. Returns a summary dict; writes checkpoints, TensorBoard
    scalars and the final parameters under workdir.

    on_step: optional `on_step(step, metrics)` called after every step (its checkpoint save
      requested and its log line written) with the 1-based step number and the step's
      metrics as host values; a stop signal received meanwhile is honoured at this boundary.
    devices: the devices to build the mesh from (default: all of them, `jax.devices()`).
    """
    maybe_initialize_distributed(cfg)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    trainer = build_trainer(cfg, devices=devices)
    model, st_sh = trainer.model, trainer.state_shardings
    frozen, frozen_extra, schedules = trainer.frozen, trainer.frozen_extra, trainer.schedules
    state, trainer.state = trainer.state, None  # the loop owns (and donates) it from here on
    tc = cfg.train
    total_steps = int(tc.num_steps)

    with trainer.context():
        data = make_data(cfg, jax.process_index(), jax.process_count(), workdir)
        ckpt_dir = os.path.join(workdir, "checkpoints")
        mngr = ocp.CheckpointManager(
            ckpt_dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=tc.get("keep_checkpoints", 3),
                save_interval_steps=tc.get("checkpoint_every", 100),
                enable_async_checkpointing=tc.get("async_checkpointing", True)))
        start = 0
        latest = mngr.latest_step()
        if latest is not None:
            abstract_state = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, st_sh)
            restored = mngr.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            state = restored["state"]
            data.set_state(restored["data"])
            start = int(jax.device_get(state.step))
            log(f"resumed from {ckpt_dir} step {start}")

        jit_step = None  # built for the first batch's shapes

        tb = _tensorboard(workdir) if jax.process_index() == 0 else None
        flops_step = flops_lib.train_step_flops(
            cfg.model, tc.global_batch_size, getattr(data, "seq_len", 0),
            cfg.data.get("images", 1) if cfg.model.model_type == "llava" else 0,
            trained_parts(cfg, state.params))
        summary = {"start_step": start, "losses": [], "nan_skipped": 0}
        t_last, steps_since = time.time(), 0
        tokens_since = 0
        max_streak = tc.get("max_nan_streak", 5)
        every = tc.get("checkpoint_every", 100)
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
                    mngr.save(step_no, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        data=ocp.args.JsonSave(data.get_state())), force=True)
                if streak >= max_streak:
                    mngr.wait_until_finished()
                    # Skipped steps leave the parameters as they were: any checkpoint holds
                    # the last good ones.
                    newest = mngr.latest_step()
                    where = (f"The newest complete checkpoint in {ckpt_dir} (step {newest}) "
                             "holds the last good parameters." if newest is not None else
                             f"No checkpoint is in {ckpt_dir} yet (checkpoint_every={every}).")
                    raise TrainingStopped(
                        f"{streak} steps in a row had a non-finite loss or gradient (at step "
                        f"{step_no}); stopping. {where}")
                if step_no % tc.get("log_every", 10) == 0 or step_no == total_steps:
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
                    if mngr.latest_step() != step_no:
                        mngr.save(step_no, args=ocp.args.Composite(
                            state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(data.get_state())), force=True)
                    mngr.wait_until_finished()
                    why = (f"signal {stop.signum}" if stop.signum is not None
                           else "another process was signalled")
                    log(f"{why}: checkpointed step {step_no} in {ckpt_dir}")
                    summary.update(stopped_at=step_no, signal=stop.signum)
                    return _finish(summary, state, tb)
            if mngr.latest_step() != total_steps and total_steps > start:
                mngr.save(total_steps, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data.get_state())), force=True)
            mngr.wait_until_finished()
        final = partition.merge(state.params, frozen)
        if cfg.train.get("export_final", True):
            from mllm_jax.convert.orbax_io import save_orbax
            # overwrite: a run restarted after it finished (e.g. preempted between this
            # export and exiting) resumes at the last step and exports the same parameters.
            save_orbax(model, final, os.path.join(workdir, "final"), overwrite=True)
        summary["final_params"] = final
        return _finish(summary, state, tb)


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
