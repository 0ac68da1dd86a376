"""Beam search as HF's (vectorized) `generate` does it, over the model's own `prefill`,
`decode_step` and `reorder_cache`."""
import jax
import jax.numpy as jnp

from mllm_jax.models.llm import cache_kv_mask

NEG = -1.0e9  # HF's "impossible" score for beams and finished hypotheses


def _take_beams(x, idx):
    """x [b, k, ...] gathered along the beam axis by idx [b, m] -> [b, m, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_generate(model, settings, params, input_ids, attention_mask, pixel_values,
                  model_inputs):
    """HF's (vectorized) beam search, step for step: top (1 + #eos, at least 2) x beams
    continuations of the summed log-probabilities; finished hypotheses scored by sum /
    generated_length ** length_penalty and kept only from the first `num_beams` candidates;
    the `early_stopping` heuristic of HF decides when a sample is done. Returns the best
    hypothesis per sample [b, max_new], its length [b] and the number of steps run."""
    max_new, eos_ids, pad_id, num_beams, length_penalty, early_stopping = settings
    b, s = input_ids.shape
    k = num_beams
    keep = max(2, 1 + len(eos_ids)) * k
    top_mask = jnp.arange(keep) < k
    eos = jnp.asarray(eos_ids, jnp.int32)
    # Prefill once per prompt, then give every beam its own copy of the cache.
    cache = model.init_cache(b, s + max_new)
    logits, cache, last_pos = model.apply({"params": params}, input_ids, attention_mask, cache,
                                          pixel_values, method="prefill", **model_inputs)
    rows = jnp.repeat(jnp.arange(b), k)
    cache = model.reorder_cache(cache, rows)
    logits, pos = logits[rows], last_pos[rows]
    kv_mask = cache_kv_mask(attention_mask, s + max_new)[rows]
    vocab = logits.shape[-1]

    def penalized(scores, length):
        return scores / (jnp.float32(length) ** jnp.float32(length_penalty))

    state = dict(
        running=jnp.full((b, k, max_new), pad_id, jnp.int32),
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
        done=jnp.full((b, k, max_new), pad_id, jnp.int32),
        done_scores=jnp.full((b, k), NEG, jnp.float32),
        done_len=jnp.zeros((b, k), jnp.int32),
        is_done=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool),
        stop=jnp.asarray(False))

    def advance(step, logits, st):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
        logp = (logp + st["running_scores"][:, :, None]).reshape(b, k * vocab)
        top_lp, top_idx = jax.lax.top_k(logp, keep)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand = _take_beams(st["running"], parent).at[:, :, step].set(token)
        hits = jnp.isin(token, eos) | (step + 1 >= max_new)
        # Continue with the best `num_beams` candidates that did not finish.
        run_lp = top_lp + hits.astype(jnp.float32) * NEG
        nxt = jax.lax.top_k(run_lp, k)[1]
        running, running_scores = _take_beams(cand, nxt), _take_beams(run_lp, nxt)
        parents = _take_beams(parent, nxt)
        # Finished candidates among the first `num_beams` enter the hypotheses.
        fin = penalized(top_lp, step + 1)
        if early_stopping is True:
            fin = fin + (jnp.all(st["is_done"], -1, keepdims=True)).astype(jnp.float32) * NEG
        fin = fin + (~st["improvable"][:, None]).astype(jnp.float32) * NEG
        just_done = hits & top_mask[None, :]
        fin = fin + (~just_done).astype(jnp.float32) * NEG
        m_scores = jnp.concatenate([st["done_scores"], fin], axis=1)
        best = jax.lax.top_k(m_scores, k)[1]
        done = _take_beams(jnp.concatenate([st["done"], cand], axis=1), best)
        done_scores = _take_beams(m_scores, best)
        done_len = _take_beams(jnp.concatenate(
            [st["done_len"], jnp.full((b, keep), step + 1, jnp.int32)], axis=1), best)
        is_done = _take_beams(jnp.concatenate([st["is_done"], just_done], axis=1), best)
        # HF's early-stop heuristic, with the length the running beams have now.
        if early_stopping == "never" and length_penalty > 0.0:
            best_running = penalized(running_scores[:, 0], max_new)
        else:
            best_running = penalized(running_scores[:, 0], step + 1)
        worst_done = jnp.where(is_done, jnp.min(done_scores, -1, keepdims=True), NEG)
        improvable = st["improvable"] & jnp.any(best_running[:, None] > worst_done, -1)
        open_beams = ~(jnp.all(is_done) & (early_stopping is True))
        stop = ~(jnp.any(improvable) & open_beams & ~jnp.all(hits))
        new = dict(running=running, running_scores=running_scores, done=done,
                   done_scores=done_scores, done_len=done_len, is_done=is_done,
                   improvable=improvable, stop=stop)
        rows = (jnp.arange(b)[:, None] * k + parents).reshape(-1)
        return new, rows, running[:, :, step].reshape(-1)

    st, rows, tok = advance(0, logits, state)
    cache = model.reorder_cache(cache, rows)

    def cond(carry):
        step, st, _, _, _ = carry
        return (step < max_new) & ~st["stop"]

    def body(carry):
        step, st, tok, pos, cache = carry
        pos = pos + 1
        logits, cache = model.apply({"params": params}, tok, pos, kv_mask, cache,
                                    method="decode_step")
        st, rows, tok = advance(step, logits, st)
        cache = model.reorder_cache(cache, rows)
        return step + 1, st, tok, pos, cache

    step, st, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), st, tok, pos, cache))
    return st["done"][:, 0], st["done_len"][:, 0], step
