"""The optimizer: warmup + cosine as HF schedules it, per-group learning rates, no weight
decay on norms and biases, global-norm clipping; and the precision / remat knobs."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mllm_jax.train.optimizer import decay_mask, group_labels, make_optimizer, schedule


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    total, peak = 100, 2e-5
    s = schedule(peak, total, warmup_ratio=0.03)
    warm = 3  # ceil(0.03 * 100), as HF's TrainingArguments.get_warmup_steps
    for step in (0, 1, 2, 3, 10, 50, 99, 100):
        if step < warm:
            want = peak * step / warm
        else:
            progress = (step - warm) / (total - warm)
            want = peak * 0.5 * (1 + math.cos(math.pi * progress))
        np.testing.assert_allclose(float(s(step)), want, rtol=1e-5, atol=1e-12)


def _params():
    r = np.random.RandomState(0)
    return {
        "multi_modal_projector": {"linear_1": {"kernel": jnp.asarray(r.randn(4, 4), jnp.float32),
                                               "bias": jnp.asarray(r.randn(4), jnp.float32)}},
        "language_model": {"model": {"norm": {"scale": jnp.ones(4, jnp.float32)},
                                     "embed_tokens": {"embedding": jnp.asarray(r.randn(8, 4),
                                                                               jnp.float32)}}},
    }


def test_decay_mask_spares_norms_and_biases():
    mask = decay_mask(_params())
    assert mask["multi_modal_projector"]["linear_1"] == {"kernel": True, "bias": False}
    assert mask["language_model"]["model"]["norm"]["scale"] is False
    assert mask["language_model"]["model"]["embed_tokens"]["embedding"] is True


def _cfg(**kw):
    c = ml_collections.ConfigDict({"lr": 1e-2, "warmup_ratio": 0.0, "weight_decay": 0.5,
                                   "b1": 0.9, "b2": 0.999, "eps": 1e-8, "grad_clip": 0.0,
                                   "lr_groups": []})
    c.update(kw)
    return c


def _one_update(cfg, grads, params):
    tx, _ = make_optimizer(cfg, params, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_group_learning_rates_and_weight_decay():
    params = _params()
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    cfg = _cfg(lr_groups=[["projector", r"^multi_modal_projector/", 1e-3]])
    labels = group_labels(params, [("projector", r"^multi_modal_projector/")])
    assert labels["multi_modal_projector"]["linear_1"]["kernel"] == "projector"
    assert labels["language_model"]["model"]["norm"]["scale"] == "default"
    # Zero gradients: the update is the decoupled weight decay alone, -lr * wd * p, and only
    # where decay applies.
    u = _one_update(cfg, zero, params)
    k = params["multi_modal_projector"]["linear_1"]["kernel"]
    np.testing.assert_allclose(u["multi_modal_projector"]["linear_1"]["kernel"],
                               -1e-3 * 0.5 * k, rtol=1e-5)
    assert not np.any(u["multi_modal_projector"]["linear_1"]["bias"])
    assert not np.any(u["language_model"]["model"]["norm"]["scale"])
    e = params["language_model"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(u["language_model"]["model"]["embed_tokens"]["embedding"],
                               -1e-2 * 0.5 * e, rtol=1e-5)


def test_global_norm_clipping():
    params = _params()
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 3.0), params)
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads))))
    import optax
    cfg = _cfg(weight_decay=0.0, grad_clip=1.0, b1=0.0, b2=0.0, eps=0.0)
    tx, _ = make_optimizer(cfg, params, total_steps=10)
    clip_state = tx.init(params)
    clipped, _ = tx.update(grads, clip_state, params)
    # b1=b2=0, eps=0: Adam's step is lr * sign(g) regardless of scale, so look at the
    # clipping stage directly.
    clip = optax.clip_by_global_norm(1.0)
    c, _ = clip.update(grads, clip.init(params))
    got = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(c))))
    assert norm > 1 and abs(got - 1.0) < 1e-5
    assert jax.tree_util.tree_structure(clipped) == jax.tree_util.tree_structure(params)
