"""AdamW with warmup + cosine, per-group learning rates, no decay on norms and biases,
global-norm clipping."""
import copy

import flax
import jax
import ml_collections
import optax

from mllm_jax.train.partition import compile_patterns, path_str

DECAYED_LEAVES = ("kernel", "embedding")


def schedule(peak_lr: float, total_steps: int, warmup_ratio: float = 0.0,
             warmup_steps: int | None = None, end_lr_ratio: float = 0.0):
    """Linear warmup from 0 then cosine decay to `end_lr_ratio * peak_lr` (HF's
    `get_cosine_schedule_with_warmup` when end_lr_ratio is 0)."""
    warmup = warmup_steps if warmup_steps is not None else int(
        -(-warmup_ratio * total_steps // 1))  # ceil, as HF's TrainingArguments
    warmup = min(warmup, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak_lr * end_lr_ratio)


def group_labels(params, groups):
    """Each leaf's group: the first `(name, regex)` of `groups` that matches, else 'default'."""
    compiled = list(zip([name for name, _ in groups],
                        compile_patterns([p for _, p in groups], "train.lr_groups", " regex")))

    def label(path, _):
        s = path_str(path)
        for name, pattern in compiled:
            if pattern.search(s):
                return name
        return "default"
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: label(k, v) for k, v in flat.items()})


def decay_mask(params):
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {k: k[-1] in DECAYED_LEAVES for k in flat})


# The optimizer's settings and their defaults: the one home of these defaults (a training
# config's `train` section holds them, see `train.recipe.base`).
# warmup_steps > 0 replaces warmup_ratio; end_lr_ratio: the cosine's final learning rate as
# a fraction of the peak (BLIP-2: min lr 1e-5 of 1e-4).
DEFAULTS = {"lr": 1e-3, "warmup_ratio": 0.03, "warmup_steps": 0, "end_lr_ratio": 0.0,
            "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "grad_clip": 1.0,
            "lr_groups": []}


def settings(**overrides) -> ml_collections.ConfigDict:
    """The optimizer settings: DEFAULTS with `overrides` (a name not in DEFAULTS is an
    error)."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"unknown optimizer setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    return ml_collections.ConfigDict({**copy.deepcopy(DEFAULTS), **overrides})


def make_optimizer(cfg, params, total_steps: int):
    """cfg (ConfigDict, e.g. `settings(...)` or a training config's `train` section): lr,
    warmup_ratio (or warmup_steps), end_lr_ratio, weight_decay, b1, b2, eps, grad_clip,
    lr_groups (a list of [name, regex, lr])."""
    groups = [(g[0], g[1], float(g[2])) for g in cfg.lr_groups]
    lrs = {"default": float(cfg.lr), **{n: lr for n, _, lr in groups}}
    labels = group_labels(params, [(n, p) for n, p, _ in groups])
    mask = decay_mask(params)

    def sched(lr):
        return schedule(lr, total_steps, cfg.warmup_ratio,
                        warmup_steps=int(cfg.get("warmup_steps", 0) or 0) or None,
                        end_lr_ratio=float(cfg.get("end_lr_ratio", 0.0)))

    def adamw(lr):
        return optax.adamw(
            sched(lr),
            b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=mask)

    used = set(jax.tree_util.tree_leaves(labels))
    tx = optax.multi_transform({name: adamw(lr) for name, lr in lrs.items() if name in used},
                               labels)
    clip = cfg.grad_clip
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, {name: sched(lr) for name, lr in lrs.items()}
