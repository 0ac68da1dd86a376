"""The training step: objectives, gradient accumulation, the NaN/Inf guard.

Gradients are taken with respect to the trainable tree only; the frozen tree (and the DPO
reference) enter as plain inputs, so XLA computes no weight gradient for them.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mllm_jax.models import registry
from mllm_jax.train import losses
from mllm_jax.train.partition import merge


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # batches consumed
    params: Any  # trainable tree (float32 master weights)
    opt_state: Any
    rng: jnp.ndarray
    nan_skipped: jnp.ndarray  # updates skipped for a non-finite loss or gradient, in total
    nan_streak: jnp.ndarray  # ... in a row, up to now


def init_state(params, tx, rng) -> TrainState:
    z = jnp.zeros((), jnp.int32)
    return TrainState(step=z, params=params, opt_state=tx.init(params), rng=rng,
                      nan_skipped=z, nan_streak=z)


def _apply(model, params, method, *args, **kw):
    return model.apply({"params": params}, *args, method=method, **kw)


def sample_inputs(model, batch) -> dict:
    """The batch's per-sample model inputs that the model's family names
    (`registry.sample_input_keys`, e.g. InstructBLIP's Q-Former instruction); a ValueError
    when the batch lacks one."""
    keys = registry.sample_input_keys(model.cfg)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"model_type {model.cfg.model_type!r} reads {list(keys)} with every "
                         f"sample; the batch has no {missing}: train it from data.source="
                         "llava_json / tfds / synthetic, which build them")
    return {k: batch[k] for k in keys}


def image_inputs(model, batch) -> dict:
    """The batch's keywords that come with its images (`registry.image_input_keys`, e.g.
    LLaVA-NeXT's `image_sizes`), those it has."""
    return {k: batch[k] for k in registry.image_input_keys(model.cfg) if k in batch}


def lm_objective(model, params, batch, frozen_extra, *, chunk_size=2048):
    """Masked next-token cross-entropy: (sum of NLL, label tokens, metrics)."""
    del frozen_extra
    h = _apply(model, params, "hidden_states", batch["input_ids"], batch.get("pixel_values"),
               batch.get("attention_mask"), segment_ids=batch.get("segment_ids"),
               position_ids=batch.get("position_ids"), **sample_inputs(model, batch),
               **image_inputs(model, batch))
    head = _apply(model, params, "output_head")
    loss_sum, n = losses.masked_lm_loss(h, batch["labels"], head, chunk_size)
    return loss_sum, n, {}


def dpo_objective(model, params, batch, frozen_extra, *, beta=0.1, chunk_size=2048):
    """DPO over (chosen, rejected) pairs sharing their images. The vision tower runs once per
    pair (it is frozen, so policy and reference share it); each side projects it with its own
    connector. frozen_extra["ref"] holds the full reference parameters. Packed rows
    (`data.packing`: chosen_/rejected_segment_ids and _position_ids) hold one pair per
    segment, the same segments on both sides: log-probs are summed per segment and the loss
    counts the pairs present."""
    if registry.sample_input_keys(model.cfg):
        raise ValueError(f"model_type {model.cfg.model_type!r} reads "
                         f"{list(registry.sample_input_keys(model.cfg))} with every sample; "
                         "the dpo objective does not pass them: train it with the lm objective")
    ref = frozen_extra["ref"]
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = jnp.concatenate([batch["chosen_labels"], batch["rejected_labels"]])
    b = batch["chosen_input_ids"].shape[0]
    packed = "chosen_segment_ids" in batch
    seg, rows = None, {}
    if packed:
        seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
        rows = {"segment_ids": seg, "position_ids": jnp.concatenate(
            [batch["chosen_position_ids"], batch["rejected_position_ids"]])}

    def logps(p, vis):
        kw = dict(rows)
        if vis is not None:
            feats = _apply(model, p, "project", vis)
            kw["image_features"] = jnp.concatenate([feats, feats])
        h = _apply(model, p, "hidden_states", ids, None, mask, **kw)
        return losses.sequence_logprob(h, labels, _apply(model, p, "output_head"), chunk_size,
                                       segment_ids=seg)

    vis = None
    if batch.get("pixel_values") is not None:
        pix = batch["pixel_values"]
        bb, m = pix.shape[:2]
        vis = jax.lax.stop_gradient(
            _apply(model, params, "vision_features", pix.reshape(bb * m, *pix.shape[2:])))
        vis = vis.reshape(bb, m, *vis.shape[1:])
    pi = logps(params, vis)
    ref_lp = jax.lax.stop_gradient(logps(ref, vis))
    per_pair, r_c, r_r = losses.dpo_loss(pi[:b], pi[b:], ref_lp[:b], ref_lp[b:], beta)
    # Which entries are pairs: every row, or (packed) the segments a row holds.
    pairs = (losses.segments_present(batch["chosen_segment_ids"]) if packed
             else jnp.ones((b,), bool))
    w = pairs.astype(per_pair.dtype)
    metrics = {"reward_margin": jnp.sum((r_c - r_r) * w),
               "reward_accuracy": jnp.sum((r_c > r_r) & pairs)}
    return jnp.sum(per_pair * w), jnp.sum(pairs, dtype=jnp.int32), metrics


def _micro_batches(batch, accum):
    """[B, ...] -> [accum, B/accum, ...], micro-batch i = rows i, i+accum, ... so each
    device keeps feeding its own rows."""
    def split(x):
        if x is None:
            return None
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accum} micro-batches")
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree_util.tree_map(split, batch)


def make_train_step(model, objective: Callable, tx, accum_steps: int = 1, *,
                    uses_rng: bool = False, project: Callable | None = None):
    """Returns step(state, frozen, frozen_extra, batch) -> (state, metrics).

    uses_rng: the objective takes `rng=`, fold_in(fold_in(state.rng, state.step),
      micro-batch index): a function of the state alone, so a resumed run draws the same.
    project: applied to the trainable parameters after each update (e.g. a clamp)."""

    def step(state: TrainState, frozen, frozen_extra, batch):
        step_rng = jax.random.fold_in(state.rng, state.step) if uses_rng else None

        def loss_fn(trainable, micro, index):
            kw = {"rng": jax.random.fold_in(step_rng, index)} if uses_rng else {}
            lsum, n, aux = objective(model, merge(trainable, frozen), micro, frozen_extra,
                                     **kw)
            return lsum, (n, aux)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum_steps == 1:
            (lsum, (n, aux)), grads = grad_fn(state.params, batch, 0)
        else:
            micro = _micro_batches(batch, accum_steps)

            def body(carry, xs):
                mb, index = xs
                (l, (k, a)), g = grad_fn(state.params, mb, index)
                cl, ck, ca, cg = carry
                return (cl + l, ck + k, jax.tree_util.tree_map(jnp.add, ca, a),
                        jax.tree_util.tree_map(jnp.add, cg, g)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            (l0, (k0, a0)), g0 = grad_fn(state.params, first, 0)
            rest = jax.tree_util.tree_map(lambda x: x[1:], micro)
            (lsum, n, aux, grads), _ = jax.lax.scan(
                body, (l0, k0, a0, g0), (rest, jnp.arange(1, accum_steps)))

        denom = jnp.maximum(n, 1).astype(jnp.float32)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = lsum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        def update(operands):
            params, opt_state, grads = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (project(params) if project is not None else params), opt_state

        # A branch, not a select over every parameter: a skipped update costs nothing.
        new_params, new_opt = jax.lax.cond(
            finite, update, lambda operands: operands[:2],
            (state.params, state.opt_state, grads))
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            nan_skipped=state.nan_skipped + (~finite).astype(jnp.int32),
            nan_streak=jnp.where(finite, 0, state.nan_streak + 1),
        )
        # The streak rides with the metrics so the loop's NaN guard reads it when it reads
        # them (every few steps), without a read of its own.
        metrics = {"loss": loss, "grad_norm": grad_norm, "label_tokens": n,
                   "finite": finite, "nan_streak": new_state.nan_streak,
                   **{k: v / denom for k, v in aux.items()}}
        return new_state, metrics

    return step
