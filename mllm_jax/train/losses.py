"""Losses: masked next-token cross-entropy computed in token chunks, and DPO.

`labels` are aligned with `input_ids` as HF does it (-100 = no loss); position t predicts
labels[t + 1]. The output projection and the log-softmax are one operation with a written-out
gradient (`linear_target_logprobs`); over several chunks, each chunk's logits are recomputed
in the backward pass (jax.checkpoint), so [batch, seq, vocab] logits never exist at once.
"""
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IGNORE_INDEX = -100


def shift_labels(labels):
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def _logits(h, w, vocab_major):
    if vocab_major:  # tied embeddings [vocab, d]
        return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear_target_logprobs(h, w, targets, vocab_major: bool):
    """log softmax(h @ w)[target] for tokens h [..., d]; 0 where the target is IGNORE_INDEX.

    w is the output head, [d, vocab] (or [vocab, d] when vocab_major, for tied embeddings).
    Logits and softmax are float32. The gradient is written out: XLA's derived one scatters
    into the vocabulary axis and transposes the [tokens, vocab] matrix, which costs more
    than the two matmuls it feeds.
    """
    return _linear_logprobs_fwd(h, w, targets, vocab_major)[0]


def _linear_logprobs_fwd(h, w, targets, vocab_major):
    logits = _logits(h, w, vocab_major)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked - lse, 0.0), (h, w, logits, lse, safe, valid)


def _linear_logprobs_bwd(vocab_major, residuals, g):
    h, w, logits, lse, safe, valid = residuals
    g = jnp.where(valid, g, 0.0)
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32)
    d_logits = (g[..., None] * (onehot - jnp.exp(logits - lse[..., None]))).astype(h.dtype)
    if vocab_major:
        dh = jnp.einsum("...v,vd->...d", d_logits, w)
        dw = jnp.einsum("...v,...d->vd", d_logits, h)
    else:
        dh = jnp.einsum("...v,dv->...d", d_logits, w)
        dw = jnp.einsum("...d,...v->dv", h, d_logits)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


linear_target_logprobs.defvjp(_linear_logprobs_fwd, _linear_logprobs_bwd)


def batch_axes() -> tuple:
    """The mesh axes the rules split a batch over (`activation_batch`), in the current mesh;
    () outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = nn.logical_to_mesh_axes(("activation_batch",))[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def token_logprobs(hidden, targets, head, chunk_size: int = 2048):
    """log p(target) for every position ([b, s], 0 where the target is ignored).

    hidden: [b, s, d] final hidden states; head: (weight, vocab_major) of the output
    projection. Each device takes the tokens of its own rows, `chunk_size` at a time (on
    one device: the batch's tokens, as one device always did). Under a mesh that splits
    the batch that is a `jax.shard_map` over the batch axes: the head is gathered whole
    once (but for its vocabulary, which stays split over `activation_vocab`), the chunks
    loop without collectives but the per-token softmax sums of a split vocabulary, and
    the head's gradient is summed over the batch shards once, after the loop.
    """
    w, vocab_major = head
    h = hidden.astype(w.dtype)
    local = partial(_local_logprobs, vocab_major=vocab_major, chunk_size=chunk_size)
    axes = batch_axes()
    mesh = jax.sharding.get_abstract_mesh()
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if shards == 1 or h.shape[0] % shards:
        return local(h, targets, w)
    w = nn.with_logical_constraint(
        w, ("activation_vocab", None) if vocab_major else (None, "activation_vocab"))
    rows = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P()), out_specs=rows,
                         axis_names=set(axes), check_vma=False)(h, targets, w)


def _local_logprobs(h, targets, w, *, vocab_major, chunk_size):
    """token_logprobs of rows that are all on this device: their tokens, flattened, in
    chunks of `chunk_size`."""
    b, s, d = h.shape
    n_tok = b * s
    h = h.reshape(n_tok, d)
    t = targets.reshape(n_tok)
    c = min(chunk_size, n_tok)
    n = -(-n_tok // c)
    if n == 1:  # one chunk: nothing to save by recomputing the logits
        return linear_target_logprobs(h, w, t, vocab_major).reshape(b, s)
    pad = n * c - n_tok
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t = jnp.pad(t, (0, pad), constant_values=IGNORE_INDEX)

    @jax.checkpoint
    def chunk(hc, tc):
        return linear_target_logprobs(hc, w, tc, vocab_major)

    _, lp = jax.lax.scan(lambda carry, xs: (carry, chunk(*xs)), None,
                         (h.reshape(n, c, d), t.reshape(n, c)))
    return lp.reshape(n * c)[:n_tok].reshape(b, s)


def masked_lm_loss(hidden, labels, head, chunk_size: int = 2048):
    """(sum of token NLL, number of label tokens). Divide once over the global batch so
    micro-batching and data parallelism give the same mean as one big batch."""
    targets = shift_labels(labels)
    lp = token_logprobs(hidden, targets, head, chunk_size)
    n = jnp.sum(targets != IGNORE_INDEX)
    return -jnp.sum(lp), n


def sequence_logprob(hidden, labels, head, chunk_size: int = 2048, segment_ids=None):
    """Sum of log-probs over each sample's label (completion) tokens: [b]; with segment_ids
    (packed rows, `data.packing`) per sample: [b, s], `segment_sums` of the token log-probs.
    A packed sample's first label is IGNORE_INDEX, so no sum takes a target across a
    sample boundary."""
    lp = token_logprobs(hidden, shift_labels(labels), head, chunk_size)
    if segment_ids is None:
        return jnp.sum(lp, axis=1)
    return segment_sums(lp, segment_ids)


def segment_sums(values, segment_ids):
    """Per-row sums of values [b, s] by segment: [b, s], column k the sum over segment k + 1
    (segment 0, padding, is left out; a row of s tokens holds at most s segments)."""
    s = values.shape[1]

    def row(v, seg):
        return jax.ops.segment_sum(v, seg, num_segments=s + 1)[1:]
    return jax.vmap(row)(values, segment_ids)


def segments_present(segment_ids):
    """[b, s] bool: whether segment k + 1 holds a token of the row (column k, as
    `segment_sums`)."""
    return segment_sums(jnp.ones(segment_ids.shape, jnp.int32), segment_ids) > 0


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), per pair, plus the implicit
    rewards (for logging)."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    losses = -jax.nn.log_sigmoid(beta * margin)
    return losses, beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
