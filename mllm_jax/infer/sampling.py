"""HF's sampling warpers and token choice: greedy, or a draw from the warped logits."""
import jax
import jax.numpy as jnp


def warp_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0):
    """HF's sampling warpers in HF's order (temperature, top-k, top-p): float32 logits with
    the filtered-out tokens set to the float32 minimum."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / jnp.float32(temperature)
    neg = jnp.finfo(jnp.float32).min
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        # HF drops a token when the probability mass strictly above it reaches top_p; the
        # most likely token always stays.
        keep = (mass_above < top_p).at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample_logits(logits, rng, *, do_sample=False, temperature=1.0, top_k=0, top_p=1.0):
    """Next tokens [b] from logits [b, vocab]: argmax, or a draw from the warped logits."""
    if not do_sample:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    logits = warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
