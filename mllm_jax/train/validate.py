"""Checks of a training config's values, made before any work: when the config is loaded
(`config_file.load`, `config_file.apply_overrides`) and, for what depends on the devices
(the mesh against the device count and the batch), when `train` starts.

Every problem is collected and reported at once (`ConfigError`, a ValueError), each naming
the field, its value and what would be accepted. Only fields present are checked, so a
partial config (a test's, a recipe's section) is checked as far as it goes.
"""
import math
import re

import numpy as np

# Floating dtypes the models compute in and store parameters in.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# Counts: field -> (smallest value, what the field is, why smaller values are refused).
COUNTS = {
    "train.global_batch_size": (1, "sequences per step over all devices", ""),
    "train.micro_batches": (1, "gradient-accumulation steps per step", ""),
    "train.num_steps": (0, "the number of optimizer steps", ""),
    "train.log_every": (1, "steps between log lines", ""),
    "train.checkpoint_every": (1, "steps between checkpoints", ""),
    "train.keep_checkpoints": (
        1, "the number of newest checkpoints kept",
        "0 would keep none: every checkpoint would be deleted as soon as it is written, "
        "including the one a preempted run needs to resume"),
    "train.max_nan_streak": (1, "non-finite steps in a row before the run stops",
                             "0 would stop the run after its first step"),
    "train.loss_chunk": (1, "tokens per device per output-projection chunk", ""),
    "train.seed": (0, "the seed of the training RNG", ""),
    "train.warmup_steps": (0, "warmup steps (0: train.warmup_ratio decides)", ""),
    "init.seed": (0, "the seed of the random initialisation", ""),
    "data.text_len": (1, "text tokens per synthetic sequence", ""),
    "data.images": (0, "images per sample", ""),
    "data.seed": (0, "the seed of the data order", ""),
    "data.max_length": (1, "the longest tokenized sample", ""),
    "data.workers": (0, "data-loading worker threads (0: load in the training thread)", ""),
    "data.distinct_batches": (0, "distinct synthetic batches (0: every batch new)", ""),
    "data.packing_images": (0, "images a packed row holds (0: as many as fit)", ""),
}

# Real numbers: field -> (low, high, low included, high included, what it is).
NUMBERS = {
    "train.lr": (0.0, math.inf, True, False, "the peak learning rate"),
    "train.warmup_ratio": (0.0, 1.0, True, True, "the fraction of steps spent warming up"),
    "train.weight_decay": (0.0, math.inf, True, False, "AdamW's weight decay"),
    "train.b1": (0.0, 1.0, True, False, "Adam's first-moment decay"),
    "train.b2": (0.0, 1.0, True, False, "Adam's second-moment decay"),
    "train.eps": (0.0, math.inf, True, False, "Adam's epsilon"),
    "train.grad_clip": (0.0, math.inf, True, False,
                        "the global gradient-norm clip (0: no clipping)"),
    "train.end_lr_ratio": (0.0, 1.0, True, True,
                           "the final learning rate as a fraction of the peak"),
}

FLAGS = ("train.async_checkpointing", "train.export_final", "distributed.enabled",
         "data.packing")


class ConfigError(ValueError):
    """Invalid config values; `problems` holds one sentence per problem."""

    def __init__(self, problems, source=""):
        self.problems = list(problems)
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}invalid config: {self.problems[0]}"
        else:
            message = (f"{where}{len(self.problems)} problems in the config:\n  - "
                       + "\n  - ".join(self.problems))
        super().__init__(message)

    def __str__(self):
        return self.args[0]


class UnknownFieldError(ConfigError, KeyError):
    """A ConfigError that names a field the config does not have (also a KeyError, as
    ml_collections raises for an unknown field)."""


_MISSING = object()


def value_of(cfg, dotted):
    """The value at a dotted path, or `_MISSING`."""
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_)))


def problems(cfg) -> list[str]:
    """Every problem of the config's values that can be seen without the devices."""
    out = []
    for field, (low, what, why) in COUNTS.items():
        v = value_of(cfg, field)
        if v is _MISSING:
            continue
        if not is_int(v) or v < low:
            reason = f" ({why})" if why and is_int(v) else ""
            out.append(f"{field} = {v!r}: must be an integer >= {low}, {what}{reason}")
    for field, (low, high, low_in, high_in, what) in NUMBERS.items():
        v = value_of(cfg, field)
        if v is _MISSING:
            continue
        ok = is_number(v) and math.isfinite(v) and (low <= v if low_in else low < v) and (
            v <= high if high_in else v < high)
        if not ok:
            out.append(f"{field} = {v!r}: must be a number in {'[' if low_in else '('}{low:g}, "
                       f"{high:g}{']' if high_in else ')'}, {what}")
    for field in FLAGS:
        v = value_of(cfg, field)
        if v is not _MISSING and not isinstance(v, (bool, np.bool_)):
            out.append(f"{field} = {v!r}: must be True or False")
    out += _batch_problems(cfg)
    out += _dtype_problems(cfg)
    out += _regex_problems(cfg)
    out += _objective_problems(cfg)
    out += _packing_problems(cfg)
    out += _image_placement_problems(cfg)
    out += _mesh_value_problems(cfg)
    out += _model_problems(cfg)
    return out


def _model_problems(cfg):
    """The model family's own checks (heads divide the width, layer counts, ...)."""
    model = value_of(cfg, "model")
    if model is _MISSING:
        return []
    from mllm_jax.models import registry
    try:
        registry.check_config(model, "model")
    except (registry.InvalidConfigError, registry.UnsupportedModelError) as e:
        return [str(e)]
    return []


def check(cfg, source=""):
    """Raises ConfigError listing every problem `problems` finds."""
    found = problems(cfg)
    if found:
        raise ConfigError(found, source)


def _batch_problems(cfg):
    batch = value_of(cfg, "train.global_batch_size")
    micro = value_of(cfg, "train.micro_batches")
    if is_int(batch) and is_int(micro) and batch >= 1 and micro >= 1 and batch % micro:
        fits = [m for m in range(1, batch + 1) if batch % m == 0]
        near = sorted(fits, key=lambda m: (abs(m - micro), m))[:2]
        return [f"train.micro_batches = {micro} does not divide train.global_batch_size = "
                f"{batch} (each micro-batch takes an equal share of the batch): use "
                f"micro_batches {' or '.join(map(str, sorted(near)))}, or a batch size "
                f"that is a multiple of {micro}"]
    return []


def _dtype_problems(cfg):
    out = []
    for field, empty_ok in (("model.dtype", False), ("model.param_dtype", False),
                            ("stage.frozen_dtype", True)):
        v = value_of(cfg, field)
        if v is _MISSING or v is None or (empty_ok and v == ""):
            continue
        if v not in FLOAT_DTYPES:
            allowed = ", ".join(FLOAT_DTYPES) + (" or '' (as stored)" if empty_ok else "")
            out.append(f"{field} = {v!r} is not a known dtype; use {allowed}")
    return out


def _regex_problem(field, pattern):
    if not isinstance(pattern, str):
        return f"{field} = {pattern!r}: must be a regular expression (a string)"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{field} = {pattern!r} is not a valid regular expression: {e}"
    return None


def _regex_problems(cfg):
    out = []
    trainable = value_of(cfg, "stage.trainable")
    if trainable is not _MISSING:
        if isinstance(trainable, str) or not isinstance(trainable, (list, tuple)):
            out.append(f"stage.trainable = {trainable!r}: must be a list of regular "
                       "expressions over parameter paths, e.g. ['^multi_modal_projector/']")
        else:
            if not trainable:
                out.append("stage.trainable is empty: name the trainable parameters with "
                           "regular expressions, e.g. ['^multi_modal_projector/']")
            for i, p in enumerate(trainable):
                out.append(_regex_problem(f"stage.trainable[{i}]", p))
    groups = value_of(cfg, "train.lr_groups")
    if groups is not _MISSING:
        shape = "a list of [name, regex, lr], e.g. [['projector', '^multi_modal_projector/', 2e-5]]"
        if isinstance(groups, str) or not isinstance(groups, (list, tuple)):
            out.append(f"train.lr_groups = {groups!r}: must be {shape}")
        else:
            for i, g in enumerate(groups):
                field = f"train.lr_groups[{i}]"
                if isinstance(g, str) or not isinstance(g, (list, tuple)) or len(g) != 3:
                    out.append(f"{field} = {g!r}: must be [name, regex, lr]")
                    continue
                name, pattern, lr = g
                if not isinstance(name, str) or not name or name == "default":
                    out.append(f"{field}: the name {name!r} must be a non-empty string other "
                               "than 'default' (the group of every other parameter)")
                out.append(_regex_problem(f"{field} regex", pattern))
                if not (is_number(lr) and math.isfinite(lr) and lr >= 0):
                    out.append(f"{field}: the learning rate {lr!r} must be a number >= 0")
    return [p for p in out if p]


def _objective_problems(cfg):
    name = value_of(cfg, "stage.objective")
    if name is _MISSING:
        return []
    from mllm_jax.train import objectives
    known = objectives.names()
    if name not in known:
        return [f"stage.objective = {name!r} is not a registered objective; known: "
                f"{', '.join(known)} (train.register_objective adds one)"]
    images = value_of(cfg, "data.images")
    if objectives.data_mode(name) == "image_text" and images is not _MISSING and images != 1:
        return [f"data.images = {images!r}: stage.objective {name!r} reads image-caption "
                "pairs, one image per sample; set data.images=1"]
    return []


def _packing_problems(cfg):
    """data.packing packs the samples of one LLaVA JSON / TFDS source for the lm and dpo
    objectives (data/packing.py)."""
    if value_of(cfg, "data.packing") is not True:
        return []
    out = []
    source = value_of(cfg, "data.source")
    if source not in (_MISSING, "llava_json", "tfds"):
        out.append(f"data.packing = True with data.source = {source!r}: packing fills rows "
                   "with tokenized samples of data.source llava_json or tfds; set "
                   "data.packing=False")
    if value_of(cfg, "data.mixture") not in (_MISSING, None, [], ()):
        out.append("data.packing = True with a data.mixture: mixtures are not packed; set "
                   "data.packing=False or train on one source")
    name = value_of(cfg, "stage.objective")
    if name is not _MISSING:
        from mllm_jax.train import objectives
        if name in objectives.names() and objectives.data_mode(name) not in ("lm", "dpo"):
            out.append(f"data.packing = True with stage.objective {name!r}: only the lm and "
                       "dpo objectives' samples are packed; set data.packing=False")
    return out


def _image_placement_problems(cfg):
    v = value_of(cfg, "data.image_placement")
    if v is _MISSING:
        return []
    from mllm_jax.data.templates import check_image_placement
    try:
        check_image_placement(v, "data.image_placement")
    except ValueError as e:
        return [str(e)]
    return []


def _mesh_value_problems(cfg):
    out = []
    for axis in ("data", "fsdp", "tensor"):
        v = value_of(cfg, f"mesh.{axis}")
        if v is not _MISSING and not (is_int(v) and (v >= 1 or v == -1)):
            out.append(f"mesh.{axis} = {v!r}: must be a positive integer, or -1 for all the "
                       "devices the other axes leave")
    return out


def device_problems(cfg, num_devices: int) -> list[str]:
    """The mesh against the device count, and the global batch against the mesh's batch
    shards (data x fsdp): what `train` checks when it knows the devices."""
    from mllm_jax import sharding
    mesh = value_of(cfg, "mesh")
    if mesh is _MISSING or _mesh_value_problems(cfg):
        return []
    try:
        sizes = sharding.mesh_sizes(mesh, num_devices)
    except ValueError as e:
        return [str(e)]
    batch = value_of(cfg, "train.global_batch_size")
    micro = value_of(cfg, "train.micro_batches")
    micro = micro if is_int(micro) and micro >= 1 else 1
    shards = sizes["data"] * sizes["fsdp"]
    if not is_int(batch) or batch < 1 or batch % shards == 0:
        return []
    step = math.lcm(shards, micro)
    below, above = (batch // step) * step, (batch // step + 1) * step
    batches = " or ".join(str(b) for b in (below, above) if b >= 1)
    mesh_text = ", ".join(f"{k}={v}" for k, v in sizes.items())
    hint = f"use train.global_batch_size {batches}"
    alt = _mesh_for_batch(batch, num_devices, sizes)
    if alt:
        hint += (", or a mesh with " f"{alt['data'] * alt['fsdp']} batch shards: "
                 + " ".join(f"--config.mesh.{k}={v}" for k, v in alt.items())
                 + " (tensor parallelism splits attention heads and MLP columns, which the "
                   "model's sizes must allow)")
    return [f"train.global_batch_size = {batch} does not split over the mesh's data x fsdp = "
            f"{sizes['data']} x {sizes['fsdp']} = {shards} batch shards (mesh {mesh_text} on "
            f"{num_devices} devices; every shard takes an equal share of each batch): {hint}"]


def _mesh_for_batch(batch, num_devices, sizes):
    """A mesh on the same devices whose batch shards divide `batch`: as many shards as can
    be, the rest of the devices on the tensor axis, fsdp kept where it fits."""
    for shards in range(sizes["data"] * sizes["fsdp"] - 1, 0, -1):
        if num_devices % shards or batch % shards:
            continue
        fsdp = math.gcd(sizes["fsdp"], shards)
        return {"data": shards // fsdp, "fsdp": fsdp, "tensor": num_devices // shards}
    return None


def check_devices(cfg, num_devices: int):
    """Raises ConfigError listing `device_problems`."""
    found = device_problems(cfg, num_devices)
    if found:
        raise ConfigError(found)
