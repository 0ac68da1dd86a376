"""Losses: masked next-token cross-entropy computed in sequence chunks, and DPO.

`labels` are aligned with `input_ids` as HF does it (-100 = no loss); position t predicts
labels[t + 1]. The chunked loss never materializes [batch, seq, vocab] logits at once: each
chunk's logits are recomputed in the backward pass (jax.checkpoint) instead of stored.
"""
import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def shift_labels(labels):
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def token_logprobs(hidden, targets, logits_fn, chunk_size: int = 512):
    """log p(target) for every position ([b, s], 0 where target is ignored), in chunks.

    hidden: [b, s, d] final hidden states; logits_fn: [b, c, d] -> [b, c, vocab].
    """
    b, s, d = hidden.shape
    c = min(chunk_size, s)
    n = -(-s // c)
    pad = n * c - s
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hs = hidden.reshape(b, n, c, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, c).swapaxes(0, 1)

    def chunk(h, t):
        logits = logits_fn(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = t != IGNORE_INDEX
        picked = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(valid, picked - lse, 0.0)

    if n == 1:  # one chunk: nothing to save by recomputing the logits
        return chunk(hidden, targets)[:, :s]
    chunk = jax.checkpoint(chunk)

    def body(carry, xs):
        return carry, chunk(*xs)

    _, lp = jax.lax.scan(body, None, (hs, ts))
    return lp.swapaxes(0, 1).reshape(b, n * c)[:, :s]


def masked_lm_loss(hidden, labels, logits_fn, chunk_size: int = 512):
    """(sum of token NLL, number of label tokens). Divide once over the global batch so
    micro-batching and data parallelism give the same mean as one big batch."""
    targets = shift_labels(labels)
    lp = token_logprobs(hidden, targets, logits_fn, chunk_size)
    n = jnp.sum(targets != IGNORE_INDEX)
    return -jnp.sum(lp), n


def sequence_logprob(hidden, labels, logits_fn, chunk_size: int = 512):
    """Sum of log-probs over each sample's label (completion) tokens: [b]."""
    return jnp.sum(token_logprobs(hidden, shift_labels(labels), logits_fn, chunk_size), axis=1)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), per pair, plus the implicit
    rewards (for logging)."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    losses = -jax.nn.log_sigmoid(beta * margin)
    return losses, beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
