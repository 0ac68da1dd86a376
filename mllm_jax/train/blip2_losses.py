"""BLIP-2's three stage-1 losses as pure functions (LAVIS `Blip2Qformer.forward`).

ITC: image i is represented by its queries' normalised projections [q, e], caption j by its
[CLS] projection [e]; their similarity is the largest query-caption cosine divided by the
temperature (clamped to [0.001, 0.5]). Image-to-text and text-to-image cross-entropies with
label smoothing, averaged. Negatives are every other pair of the batch given: under `jit`
over a mesh that is the global batch, as LAVIS's all_gather makes it.

Pairs that share an `image_ids` value (captions of one image) are not each other's
negatives: ITC spreads the target over them, as BLIP's retrieval fine-tuning does (with
distinct ids this is LAVIS's stage-1 loss exactly), and ITM never samples them.

ITM: for each caption one image, and for each image one caption, drawn with probability
proportional to softmax(similarity) + 1e-4 over the pairs that are not matches; the ITM head
classifies [positive pairs, (negative image, caption), (image, negative caption)].

ITG: next-token cross-entropy with label smoothing over the caption's real tokens after the
first (the decoder token), averaged over tokens.
"""
import jax
import jax.numpy as jnp

TEMP_MIN, TEMP_MAX = 0.001, 0.5
NEGATIVE_WEIGHT_FLOOR = 1e-4  # LAVIS adds it to the softmax before sampling


def clamp_temperature(temp):
    """The temperature used in the loss: clamped to [0.001, 0.5] in value, with the gradient
    of the unclamped parameter (LAVIS clamps the parameter in place, outside autograd, before
    every forward; `project_temperature` clamps it after every update)."""
    return temp + jax.lax.stop_gradient(jnp.clip(temp, TEMP_MIN, TEMP_MAX) - temp)


def same_pair_mask(image_ids, n: int):
    """[n, n] bool: pairs i, j that match (the same image id; the diagonal without ids)."""
    if image_ids is None:
        return jnp.eye(n, dtype=bool)
    return image_ids[:, None] == image_ids[None, :]


def itc_similarity(image_feats, text_feats, temp):
    """sim [n_images, n_texts] = max over queries of image_feats[i, q] . text_feats[j] /
    temp. image_feats [n, q, e], text_feats [n, e] (both normalised). The text-to-image
    similarity is its transpose (LAVIS computes the same maxima twice)."""
    per_query = jnp.einsum("iqe,te->itq", image_feats.astype(jnp.float32),
                           text_feats.astype(jnp.float32))
    return jnp.max(per_query, axis=-1) / clamp_temperature(temp)


def soft_cross_entropy(logits, positives, label_smoothing: float):
    """Per-row cross-entropy [n] against targets spread evenly over each row's `positives`
    (bool [n, m]), smoothed as torch's `label_smoothing` smooths a class target:
    (1 - eps) * target + eps / m."""
    m = logits.shape[-1]
    target = positives / jnp.maximum(jnp.sum(positives, axis=-1, keepdims=True), 1)
    target = (1.0 - label_smoothing) * target + label_smoothing / m
    return -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def itc_loss(image_feats, text_feats, temp, image_ids=None, label_smoothing: float = 0.1):
    """(loss, sim): the mean of the image-to-text and text-to-image cross-entropies over
    the batch, and the similarities [n, n] (image rows, text columns)."""
    sim = itc_similarity(image_feats, text_feats, temp)
    pos = same_pair_mask(image_ids, sim.shape[0])
    i2t = soft_cross_entropy(sim, pos, label_smoothing)
    t2i = soft_cross_entropy(sim.T, pos.T, label_smoothing)
    return (jnp.mean(i2t) + jnp.mean(t2i)) / 2, sim


def negative_weights(sim, image_ids=None):
    """Sampling weights [n, n] of the hard negatives of each row: softmax(sim) + 1e-4, zero
    on the row's matches (no gradient)."""
    sim = jax.lax.stop_gradient(sim)
    w = jax.nn.softmax(sim.astype(jnp.float32), axis=1) + NEGATIVE_WEIGHT_FLOOR
    return jnp.where(same_pair_mask(image_ids, sim.shape[0]), 0.0, w)


def sample_negatives(rng, weights):
    """One column per row drawn with probability weights[i] / sum(weights[i]): (index [n],
    valid [n] bool: False for a row with no possible negative, whose index is meaningless)."""
    valid = jnp.any(weights > 0, axis=1)
    logits = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
    logits = jnp.where(valid[:, None], logits, 0.0)
    return jax.random.categorical(rng, logits, axis=1), valid


def hard_negatives(rng, sim, image_ids=None):
    """(negative image per text [n], negative text per image [n], valid_image [n],
    valid_text [n]): images from the text-to-image weights, texts from the image-to-text
    weights, with two independent draws of `rng`."""
    k_img, k_txt = jax.random.split(rng)
    neg_img, ok_img = sample_negatives(k_img, negative_weights(sim.T, image_ids))
    neg_txt, ok_txt = sample_negatives(k_txt, negative_weights(sim, image_ids))
    return neg_img, neg_txt, ok_img, ok_txt


def itm_loss(logits, valid=None):
    """Cross-entropy of the ITM head's logits [3n, 2] for [n positives, 2n negatives]
    (labels 1, 0, 0), averaged over the rows (`valid` [3n] bool leaves rows out: negatives
    that could not be drawn). Returns (loss, accuracy)."""
    n = logits.shape[0] // 3
    labels = jnp.concatenate([jnp.ones(n, jnp.int32), jnp.zeros(2 * n, jnp.int32)])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    w = jnp.ones_like(nll) if valid is None else valid.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    return jnp.sum(w * nll) / denom, jnp.sum(w * correct) / denom


def itg_loss(logits, input_ids, attention_mask, label_smoothing: float = 0.1):
    """Next-token cross-entropy with label smoothing: logits [n, t, vocab] at position i
    predict input_ids[:, i + 1] where attention_mask is 1; the mean over those tokens.
    Returns (loss, number of target tokens)."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].astype(bool)
    nll = -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    smooth = -jnp.mean(lp, axis=-1)
    per = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.maximum(n, 1), n
