"""The training checkpoints: orbax steps in `workdir/checkpoints/<step>`, each with

  state/      the TrainState (trainable parameters, optimizer state, RNG, counters)
  data/       the data pipeline's position (JSON)
  integrity/  every state array's fingerprint (JSON, `convert.integrity`)
  config/     the run's config (JSON, `cfg.to_json()`)

Restore verifies. The newest step is restored and its arrays' fingerprints recomputed; a
step whose fingerprints differ, whose arrays orbax cannot read or whose JSON items are
unreadable is damaged: it is logged, moved (not deleted) to `workdir/damaged_checkpoints/
<step>` and the next older step is tried; if every step is damaged the run stops listing
each step and why (it never starts over from step 0 while checkpoints exist). Steps written
before records existed restore unverified.

Resume compatibility. A run resumes only with the config it was checkpointed with, except
for the fields in `MAY_CHANGE`: every other field changes what is computed (the model and
its frozen initialisation, the stage and objective, batch and sequence shapes, the data and
its order, the RNG seeds, the optimizer), so a resumed run with one of them changed would
neither continue the old run nor be a new one. `mesh` may change (restore re-shards), so may
how the same model is computed (`model.remat_policy`, `model.attention`), logging,
checkpoint cadence and retention, the step count (`train.num_steps`; the cosine decay then
ends at the new count) and the loader's thread count. Two options widen
this on purpose:
  train.resume_may_change: fields of `OPT_IN` (the learning-rate schedule and the
    optimizer's regularisation) allowed to differ from the checkpoint's;
  train.resume_partial: `stage.trainable` may differ; the parameters and optimizer-state
    arrays whose path and shape match the checkpoint's are restored, the others start as a
    fresh run would (the log lists both).
A changed field is refused naming each field with both values and what to do. A field
only one of the two configs has (added or removed by a newer version of the library, whose
defaults keep the old behaviour) is logged, not refused; a field of `ADDED_FIELDS` missing
from one config is compared as the value it had before it existed, so a run that sets it
otherwise (e.g. `data.image_placement = "llava"` against a checkpoint written before the
field) is refused like any other change.
"""
import json

import jax
import orbax.checkpoint as ocp

from mllm_jax import storage
from mllm_jax.convert import integrity

# Config fields (dotted prefixes) that may differ between a checkpoint and the run resuming
# it: they change how the run is carried out (cadence, logging, devices, processes), not
# what it computes. Everything else must match (see the module docstring).
MAY_CHANGE = (
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpointing", "train.max_nan_streak", "train.export_final",
    "train.loss_chunk",  # the same loss in token chunks of another size (memory only)
    "train.resume_may_change", "train.resume_partial",
    "mesh", "rules", "distributed", "data.workers",
    # the same model computed another way: what the backward pass keeps or recomputes
    # (memory only), the attention kernel (the same attention to rounding)
    "model.remat_policy", "model.attention",
)
# Fields a run may change on resume only when `train.resume_may_change` names them.
OPT_IN = ("train.lr", "train.warmup_ratio", "train.warmup_steps", "train.end_lr_ratio",
          "train.weight_decay", "train.grad_clip")
# Fields that `train.resume_partial` allows to change.
PARTIAL = ("stage.trainable",)
# Fields added since checkpoints were first written, with the value that gives what runs
# without them computed; a config without one is compared as having that value.
ADDED_FIELDS = {"data.image_placement": "as_written"}

DAMAGED_DIR = "damaged_checkpoints"
_ITEMS = ("state", "data", "integrity", "config")


class CheckpointDamagedError(ValueError):
    """Every checkpoint step is damaged (or unreadable)."""


class ResumeConfigError(ValueError):
    """The config differs from the checkpoint's in fields that must match."""


def _handlers():
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "integrity": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}


def config_json(cfg) -> dict:
    try:
        text = cfg.to_json()
    except (TypeError, ValueError):
        text = cfg.to_json_best_effort()
    return json.loads(text)


class _Absent:
    def __repr__(self):
        return "(absent)"


ABSENT = _Absent()  # the value of a field one of two configs does not have


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(field, prefixes):
    return any(field == p or field.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, current: dict) -> list:
    """(field, saved value, current value) for every field that differs."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, ABSENT), b.get(k, ABSENT)
        if va is ABSENT or vb is ABSENT or va != vb:
            out.append((k, va, vb))
    return out


def check_resume_config(saved: dict, cfg, where: str, log=None) -> bool:
    """Raises ResumeConfigError naming every field of `cfg` that differs from the config
    `saved` with the checkpoint `where` and may not. Returns whether `stage.trainable`
    changed (allowed by `train.resume_partial`).

    A field only one of the two configs has (added or removed by a newer version of the
    library, whose defaults keep the old behaviour) is not refused; `log` is told."""
    tc = cfg.train
    opt_in = list(tc.get("resume_may_change", []) or [])
    unknown = [f for f in opt_in if f not in OPT_IN]
    if unknown:
        raise ResumeConfigError(
            f"train.resume_may_change names {unknown}; it may name only {list(OPT_IN)} "
            "(the other fields either may always change or never on resume)")
    partial = bool(tc.get("resume_partial", False))
    refused, partial_changed, one_sided = [], False, []
    for field, old, new in config_changes(saved, config_json(cfg)):
        if _covered(field, MAY_CHANGE) or _covered(field, opt_in):
            continue
        if field in ADDED_FIELDS and (old is ABSENT or new is ABSENT):
            old, new = (ADDED_FIELDS[field] if v is ABSENT else v for v in (old, new))
            if old == new:
                continue
        if old is ABSENT or new is ABSENT:
            one_sided.append(f"{field} ({old!r} in the checkpoint, {new!r} now)")
            continue
        if _covered(field, PARTIAL):
            partial_changed = True
            if partial:
                continue
            refused.append(f"{field}: {old!r} in the checkpoint, {new!r} now (set "
                           "train.resume_partial=True to restore what matches and "
                           "initialise the rest)")
        elif _covered(field, OPT_IN):
            refused.append(f"{field}: {old!r} in the checkpoint, {new!r} now (add "
                           f"'{field}' to train.resume_may_change to allow it)")
        else:
            refused.append(f"{field}: {old!r} in the checkpoint, {new!r} now")
    if one_sided and log is not None:
        log(f"config fields only one of this run and {where} has: "
            + "; ".join(one_sided))
    if refused:
        raise ResumeConfigError(
            f"the config differs from the one {where} was written with, in "
            f"{len(refused)} field(s) that change what the run computes:\n  "
            + "\n  ".join(refused)
            + "\nResume with the checkpoint's values, or start a new run in a new workdir.")
    return partial_changed


class Checkpoints:
    """An orbax CheckpointManager on `workdir/checkpoints` with integrity records, the
    config beside every step, verified restore and fallback to older steps."""

    def __init__(self, workdir, tc, *, log=print):
        # tc.keep_checkpoints >= 1 (train.validate): a run keeping none could not resume.
        keep = tc.keep_checkpoints
        self.workdir = workdir
        self.directory = storage.join(workdir, "checkpoints")  # orbax takes gs:// itself
        self.log = log
        self._options = dict(max_to_keep=keep, save_interval_steps=tc.checkpoint_every,
                             enable_async_checkpointing=tc.async_checkpointing)
        self.mngr = self._open()

    def _open(self):
        return ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(**self._options),
            item_handlers=_handlers())

    def latest_step(self):
        return self.mngr.latest_step()

    def wait_until_finished(self):
        self.mngr.wait_until_finished()

    def save(self, step, state, data_state, cfg):
        """Saves `step` (async if configured); the fingerprints are computed first, on
        device, from the arrays being saved."""
        rec = integrity.record(state)
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            integrity=ocp.args.JsonSave(rec), config=ocp.args.JsonSave(config_json(cfg))),
            force=True)

    def committed_step(self, step) -> bool:
        """Whether `step` is complete on disk (call after `wait_until_finished`)."""
        return step in self.mngr.all_steps(read=True)

    def step_dir(self, step):
        return storage.join(self.directory, str(step))

    # ---- restore ------------------------------------------------------------------------

    def check_config(self, cfg):
        """Refuses `cfg` if it differs from the newest readable step's config in a field
        that must match (cheap: before any array is built or read)."""
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                saved = self._read_json(step, "config")
            except _Damaged:
                continue  # `restore` moves it aside and says why
            if saved is not None:
                check_resume_config(saved, cfg,
                                    f"checkpoint step {step} ({self.step_dir(step)})",
                                    log=self.log)
            return

    def restore(self, abstract_state, cfg, *, restore_leaf=None):
        """Restores the newest intact step. Returns None (no checkpoint) or a dict with
        step, state (restored into `abstract_state`'s structure), data, partial (whether
        stage.trainable changed) and the restored/initialised paths for a partial restore.

        restore_leaf: for a partial restore, `restore_leaf(path, metadata)` gives the
        ShapeDtypeStruct to restore a checkpoint leaf into, or None to skip it.
        """
        skipped = []
        for step in sorted(self.mngr.all_steps(), reverse=True):
            where = f"checkpoint step {step} ({self.step_dir(step)})"
            try:
                saved_cfg = self._read_json(step, "config")
            except _Damaged as e:
                self._skip(step, str(e), skipped)
                continue
            if saved_cfg is None:
                self.log(f"{where} was written without its config and checksums: "
                         "restoring it unchecked")
            partial = (check_resume_config(saved_cfg, cfg, where)
                       if saved_cfg is not None else False)
            try:
                out = self._restore_step(step, abstract_state, partial, restore_leaf,
                                         checked=saved_cfg is not None)
            except _Damaged as e:
                self._skip(step, str(e), skipped)
                continue
            out.update(step=step, partial=partial, skipped=skipped)
            return out
        if skipped:
            raise CheckpointDamagedError(
                f"every checkpoint in {self.directory} is damaged; each was moved to "
                f"{storage.join(self.workdir, DAMAGED_DIR)}:\n  "
                + "\n  ".join(f"step {s}: {why}" for s, why in skipped)
                + "\nRestore a copy of the workdir, or start a new run in a new workdir "
                "(the damaged steps are kept for inspection).")
        return None

    def _read_json(self, step, item):
        path = storage.join(self.step_dir(step), item)
        if not storage.isdir(path):
            return None  # written before this item existed
        try:
            return self.mngr.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001  any failure to read is damage
            raise _Damaged(f"its {item}/ item is unreadable ({type(e).__name__}: "
                           f"{_short(e)})") from e

    def _restore_step(self, step, abstract_state, partial, restore_leaf, checked):
        rec = self._read_json(step, "integrity")
        data_state = self._read_json(step, "data")
        sdir = storage.join(self.step_dir(step), "state")
        only, out = None, {}
        try:
            if partial:
                target, only = self._partial_target(step, restore_leaf)
                restored = self.mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
                out["restored_leaves"] = {
                    integrity.path_str(p): x
                    for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]
                    if isinstance(x, jax.Array)}
                state = None
            else:
                state = self.mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))["state"]
                restored = state
        except Exception as e:  # noqa: BLE001  tensorstore/orbax errors reading the arrays
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            # A step whose config matched has the state's structure: any error is damage.
            # One written without its config may be from another stage.
            if not checked and _is_structure_error(e):
                raise ResumeConfigError(
                    f"the training state in checkpoint step {step} ({sdir}) does not have "
                    f"the shapes this config gives ({_short(e, 600)}); resume with the "
                    "checkpoint's config, or start a new run in a new workdir") from e
            raise _Damaged(f"orbax could not read its arrays in {sdir} "
                           f"({type(e).__name__}: {_short(e)})") from e
        if rec is not None:
            if partial:
                # a flat {path: array} dict: its key paths give back the same paths
                bad = integrity.mismatches(out["restored_leaves"], rec, only=only)
            else:
                bad = integrity.mismatches(restored, rec)
            if bad:
                raise _Damaged(f"{len(bad)} array(s) in {sdir} differ from the checksums "
                               f"written with them: {integrity.describe(bad)}")
        out.update(state=state, data=data_state)
        return out

    def _partial_target(self, step, restore_leaf):
        meta = self.mngr.item_metadata(step)["state"]
        tree = getattr(meta, "tree", meta)
        only = set()

        def leaf(path, m):
            p = integrity.path_str(path)
            t = restore_leaf(p, m)
            if t is None:
                return ocp.PLACEHOLDER
            only.add(p)
            return t

        return jax.tree_util.tree_map_with_path(leaf, _plain(tree)), only

    def _skip(self, step, why, skipped):
        src = self.step_dir(step)
        dst_root = storage.join(self.workdir, DAMAGED_DIR)
        dst = storage.join(dst_root, str(step))
        if jax.process_index() == 0:
            storage.makedirs(dst_root)
            n = 1
            while storage.exists(dst):
                dst = storage.join(dst_root, f"{step}.{n}")
                n += 1
            storage.move(src, dst)  # remote: copied object by object, then deleted
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"skip checkpoint {step}")
        self.log(f"checkpoint step {step} is damaged, skipped and moved to {dst}: {why}")
        skipped.append((step, why))
        self.mngr.close()
        self.mngr = self._open()


class _Damaged(Exception):
    pass


def _plain(tree):
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    return tree


def _is_structure_error(e) -> bool:
    text = str(e)
    return ("structures do not match" in text or "partial_restore" in text
            or "shape" in text.lower() and "mismatch" in text.lower())


def _short(e, n=300):
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[:n] + " ..."
