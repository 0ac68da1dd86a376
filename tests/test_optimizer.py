"""The optimizer: warmup + cosine as HF schedules it, per-group learning rates, no weight
decay on norms and biases, global-norm clipping; and the precision / remat knobs."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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
    """With grad_clip=1, the update equals the unclipped optimizer's update on gradients
    scaled to global norm 1; and it differs from the unclipped update on the raw ones."""
    params = _params()
    r = np.random.RandomState(3)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(r.randn(*p.shape) * 5, jnp.float32),
                                   params)
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads))))
    assert norm > 1
    scaled = jax.tree_util.tree_map(lambda g: g / norm, grads)
    # Two Adam steps so the update depends on the gradient's scale (eps matters at step 1
    # only through the ratio m/sqrt(v)); a large eps makes the scale visible.
    cfg_clip = _cfg(weight_decay=0.0, grad_clip=1.0, eps=1.0)
    cfg_none = _cfg(weight_decay=0.0, grad_clip=0.0, eps=1.0)
    clipped = _one_update(cfg_clip, grads, params)
    reference = _one_update(cfg_none, scaled, params)
    raw = _one_update(cfg_none, grads, params)
    for a, b, _ in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(reference),
                       jax.tree_util.tree_leaves(raw)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    assert max(float(jnp.abs(a - c).max()) for a, c in zip(
        jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(raw))) > 1e-5
