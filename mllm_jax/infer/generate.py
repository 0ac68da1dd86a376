"""Autoregressive generation with a KV cache: one prefill over the (left padded) prompt, then
one token per step, all under `jax.jit` with static shapes.

The cache holds `max_len = prompt_len + max_new_tokens` slots per layer. Prompts are left
padded, so every sample writes the same slot at every step (one shared write index); padded
slots are masked out of attention by the prompt's attention mask, and RoPE positions come
from the mask's cumulative sum, as in HF `generate`. Images (LLaVA) are merged into the
prompt embeddings at prefill only.

Works for `causal_lm` and `llava` models, with unrolled (`layers_{i}`) or scanned (`layers`)
parameters: the decoder layers are applied one by one from the parameter tree, scanned
stacks through `lax.scan` over the stacked parameters and caches.
"""
import contextlib
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mllm_jax import sharding
from mllm_jax.models import attention, rope
from mllm_jax.models.layers import RMSNorm, dtype_of
from mllm_jax.models.llava import check_image_tokens
from mllm_jax.models.llm import LlamaDecoderLayer, _plain

Cache = dict[str, Any]


# ---- model plumbing --------------------------------------------------------------------------

def _text_cfg(model):
    return model.cfg.text


def _decoder_params(model, params):
    if model.cfg.model_type == "llava":
        return params["language_model"]["model"]
    if model.cfg.model_type == "causal_lm":
        return params["model"]
    raise ValueError(f"generation needs a causal_lm or llava model, got {model.cfg.model_type!r}")


def _dtypes(model):
    return dtype_of(model.cfg.dtype), dtype_of(model.cfg.param_dtype)


def init_cache(model, batch: int, max_len: int) -> Cache:
    """Empty cache: keys/values per layer (a list when unrolled, stacked on a leading layer
    axis when scanned) and the shared write index."""
    t = _text_cfg(model)
    dtype, _ = _dtypes(model)
    one = attention.init_kv_cache(batch, max_len, t.num_key_value_heads, t.head_dim, dtype)
    n = t.num_hidden_layers
    # Under a mesh (and the rules context) the cache is split like the activations: batch
    # over the data axes, KV heads over the tensor axis.
    names = ("activation_batch", "activation_kv_heads", "activation_length", None)
    if model.cfg.scan_layers:
        k = jnp.broadcast_to(one["k"][None], (n, *one["k"].shape))
        k = nn.with_logical_constraint(k, (None, *names))
        return {"k": k, "v": k, "index": one["index"]}
    k = nn.with_logical_constraint(one["k"], names)
    return {"k": [k] * n, "v": [k] * n, "index": one["index"]}


def forward_cached(model, params, embeds, positions, kv_mask, cache: Cache, prefill=False):
    """Runs the decoder over `embeds` [b, s, d] written at cache slots index..index+s-1
    (prefill=True: the cache is empty and `embeds` is the whole prompt).

    positions: RoPE positions [b, s]; kv_mask: [b, max_len], 1 where a cache slot holds (or
    will hold) a real token (causality excludes slots not yet written). Returns the final
    normed hidden states [b, s, d] and the updated cache.
    """
    t = _text_cfg(model)
    dtype, param_dtype = _dtypes(model)
    dp = _decoder_params(model, params)
    b, s, _ = embeds.shape
    max_len = kv_mask.shape[1]
    index = cache["index"]
    inv_freq = rope.inverse_frequencies(t.head_dim, t.rope_theta, _plain(t.rope_scaling))
    cos, sin = rope.rope_cos_sin(positions, inv_freq, dtype)
    mask = attention.make_attention_mask(
        s, max_len, causal=True, attention_mask=kv_mask, sliding_window=t.get("sliding_window"),
        q_offset=index - (max_len - s))
    layer = LlamaDecoderLayer(t, dtype, param_dtype)

    def apply_layer(lp, x, k, v):
        new = {"k": k, "v": v, "index": index, "prefill": prefill}
        x, new = layer.apply({"params": lp}, x, mask, cos, sin, new)
        return x, new["k"], new["v"]

    x = embeds.astype(dtype)
    if model.cfg.scan_layers:
        def body(x, layer_in):
            lp, k, v = layer_in
            x, k, v = apply_layer(lp, x, k, v)
            return x, (k, v)
        x, (ks, vs) = jax.lax.scan(body, x, (dp["layers"], cache["k"], cache["v"]))
    else:
        ks, vs = [], []
        for i in range(t.num_hidden_layers):
            x, k, v = apply_layer(dp[f"layers_{i}"], x, cache["k"][i], cache["v"][i])
            ks.append(k)
            vs.append(v)
    h = RMSNorm(t.rms_norm_eps, dtype, param_dtype).apply({"params": dp["norm"]}, x)
    return h, {"k": ks, "v": vs, "index": index + s}


def _logits(model, params, h):
    return model.apply({"params": params}, h, method="logits_from_hidden").astype(jnp.float32)


def prefill(model, params, input_ids, attention_mask, cache: Cache, pixel_values=None):
    """Embeds the prompt (merging image features for LLaVA) and fills the first prompt_len
    slots of an empty cache (`init_cache`). Returns (logits of the last prompt slot [b, vocab], cache, positions of the
    last prompt token [b])."""
    if model.cfg.model_type == "llava":
        embeds = model.apply({"params": params}, input_ids, pixel_values, method="embed")
    else:
        embeds = model.apply({"params": params}, input_ids, method="embed")
    max_len = cache["k"][0].shape[-2]
    positions = jnp.cumsum(attention_mask, axis=1) - 1
    positions = jnp.where(attention_mask == 0, 0, positions).astype(jnp.int32)
    kv_mask = _kv_mask(attention_mask, max_len)
    h, cache = forward_cached(model, params, embeds, positions, kv_mask, cache, prefill=True)
    return _logits(model, params, h[:, -1]), cache, positions[:, -1]


def _kv_mask(attention_mask, max_len):
    b, s = attention_mask.shape
    return jnp.concatenate([attention_mask.astype(jnp.int32),
                            jnp.ones((b, max_len - s), jnp.int32)], axis=1)


def decode_step(model, params, cache: Cache, tokens, positions, kv_mask):
    """One token per sample: tokens [b] at RoPE positions [b], written at the cache index.
    Returns (logits [b, vocab], cache). Its cost is constant in the number of tokens already
    generated except for the attention read over the max_len cache slots."""
    embeds = model.apply({"params": params}, tokens[:, None], method="embed")
    h, cache = forward_cached(model, params, embeds, positions[:, None], kv_mask, cache)
    return _logits(model, params, h[:, 0]), cache


# ---- sampling --------------------------------------------------------------------------------

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


# ---- the loop --------------------------------------------------------------------------------

def _ends_with_stop(out, step, stops):
    """[b] bool: the tokens generated up to `step` end with one of the `stops` sequences."""
    hit = jnp.zeros((out.shape[0],), bool)
    for seq in stops:
        m = len(seq)
        if m > out.shape[1]:
            continue
        tail = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(step - m + 1, 0), m, axis=1)
        hit = hit | ((step + 1 >= m) & jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1))
    return hit


def _generate(model, settings, params, input_ids, attention_mask, pixel_values, rng):
    max_new, eos_ids, pad_id, sampling, stops = settings
    b, s = input_ids.shape
    cache = init_cache(model, b, s + max_new)
    logits, cache, last_pos = prefill(model, params, input_ids, attention_mask, cache,
                                      pixel_values)
    kv_mask = _kv_mask(attention_mask, s + max_new)
    eos = jnp.asarray(eos_ids, jnp.int32)
    sample = partial(sample_logits, **dict(sampling))

    def emit(step, logits, out, finished):
        tok = sample(logits, jax.random.fold_in(rng, step))
        tok = jnp.where(finished, pad_id, tok)
        out = out.at[:, step].set(tok)
        finished = finished | jnp.isin(tok, eos) | _ends_with_stop(out, step, stops)
        return tok, out, finished

    out = jnp.full((b, max_new), pad_id, jnp.int32)
    tok, out, finished = emit(0, logits, out, jnp.zeros((b,), bool))

    def cond(carry):
        step, _, _, finished, _, _ = carry
        return (step < max_new) & ~jnp.all(finished)

    def body(carry):
        step, tok, out, finished, pos, cache = carry
        pos = pos + 1
        logits, cache = decode_step(model, params, cache, tok, pos, kv_mask)
        tok, out, finished = emit(step, logits, out, finished)
        return step + 1, tok, out, finished, pos, cache

    step, _, out, _, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tok, out, finished, last_pos, cache))
    return out, step


# ---- beam search -----------------------------------------------------------------------------

NEG = -1.0e9  # HF's "impossible" score for beams and finished hypotheses


def _take_beams(x, idx):
    """x [b, k, ...] gathered along the beam axis by idx [b, m] -> [b, m, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _reorder_cache(cache, rows, scanned):
    axis = 1 if scanned else 0  # scanned stacks carry a leading layer axis
    take = lambda x: jnp.take(x, rows, axis=axis)
    if scanned:
        return {"k": take(cache["k"]), "v": take(cache["v"]), "index": cache["index"]}
    return {"k": [take(x) for x in cache["k"]], "v": [take(x) for x in cache["v"]],
            "index": cache["index"]}


def _beam_generate(model, settings, params, input_ids, attention_mask, pixel_values):
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
    cache = init_cache(model, b, s + max_new)
    logits, cache, last_pos = prefill(model, params, input_ids, attention_mask, cache,
                                      pixel_values)
    rows = jnp.repeat(jnp.arange(b), k)
    cache = _reorder_cache(cache, rows, model.cfg.scan_layers)
    logits, pos = logits[rows], last_pos[rows]
    kv_mask = _kv_mask(attention_mask, s + max_new)[rows]
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
    cache = _reorder_cache(cache, rows, model.cfg.scan_layers)

    def cond(carry):
        step, st, _, _, _ = carry
        return (step < max_new) & ~st["stop"]

    def body(carry):
        step, st, tok, pos, cache = carry
        pos = pos + 1
        logits, cache = decode_step(model, params, cache, tok, pos, kv_mask)
        st, rows, tok = advance(step, logits, st)
        cache = _reorder_cache(cache, rows, model.cfg.scan_layers)
        return step + 1, st, tok, pos, cache

    step, st, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), st, tok, pos, cache))
    return st["done"][:, 0], st["done_len"][:, 0], step


_COMPILED = {}  # (id(model), settings) -> (model, jitted fn); the model is kept alive


def _compiled(model, settings, fn=None):
    fn = _generate if fn is None else fn
    key = (id(model), fn.__name__, settings)
    if key not in _COMPILED:
        _COMPILED[key] = (model, jax.jit(partial(fn, model, settings)))
    return _COMPILED[key][1]


_FEATURE_SHAPES = {}  # (id(model), pixel shape, dtype) -> (model, feature shape)


def _feature_shape(model, params, pixel_values):
    """(number of images, features per image) for these pixels, traced once per shape."""
    key = (id(model), pixel_values.shape, str(pixel_values.dtype))
    if key not in _FEATURE_SHAPES:
        feats = jax.eval_shape(
            lambda p, px: model.apply({"params": p}, px, method="image_features"),
            params, pixel_values)
        _FEATURE_SHAPES[key] = (model, feats.shape[:2])
    return _FEATURE_SHAPES[key][1]


def generate(model, params, input_ids, attention_mask=None, pixel_values=None, *,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None,
             pad_token_id: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, stop_sequences=(), rng=None,
             mesh=None) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens per prompt. Returns int32 [b, n] (new tokens
    only); n < max_new_tokens when every sample emitted an EOS earlier. After its EOS a
    sample holds `pad_token_id` (default: the first EOS id), as HF `generate` does.

    input_ids: [b, s] prompts, LEFT padded; attention_mask: [b, s] (1 = real token; None =
    no padding). pixel_values (LLaVA): NHWC [n_images, h, w, c], images in the order their
    (already expanded) image tokens appear in the flattened batch, any number per prompt.
    Sampling: do_sample=False is greedy; otherwise temperature, top_k (0 = off), top_p
    (1.0 = off) as HF applies them, drawn from `rng` (a jax PRNG key; default key 0).
    Beam search (num_beams > 1, deterministic): HF's beam search with its `length_penalty`
    (the exponent of the generated length dividing a finished hypothesis' log-probability)
    and `early_stopping` (False: HF's heuristic; True: stop when `num_beams` hypotheses are
    done; "never": the canonical search); returns the best hypothesis per prompt.

    stop_sequences: token-id sequences that end a sample like an EOS does (kept in the
    output, as HF keeps a stop string); greedy and sampling only.
    mesh: a `jax.sharding.Mesh` (`mllm_jax.sharding.make_mesh`) to decode on, with the
    parameters sharded by the logical rules as in training and the prompts split over the
    data axes; the tokens equal those of a one-device run.
    """
    input_ids = np.asarray(input_ids) if not isinstance(input_ids, jax.Array) else input_ids
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if np.any(np.asarray(attention_mask)[:, -1] == 0):
        raise ValueError("prompts must be LEFT padded (attention_mask[:, -1] == 1 for all)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search here is deterministic; use num_beams=1 with do_sample, "
                         "or do_sample=False with num_beams > 1")
    stops = tuple(tuple(int(t) for t in seq) for seq in stop_sequences)
    if any(len(seq) == 0 for seq in stops):
        raise ValueError("stop_sequences must not contain an empty sequence")
    if stops and num_beams > 1:
        raise ValueError("stop_sequences work with greedy decoding and sampling; beam search "
                         "ends hypotheses at eos_token_id only")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got "
                         f"{early_stopping!r}")
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if model.cfg.model_type == "llava":
        if pixel_values is not None:
            pixel_values = jnp.asarray(pixel_values)
            n_images, per_image = _feature_shape(model, params, pixel_values)
            check_image_tokens(np.asarray(input_ids), n_images, per_image,
                               model.cfg.image_token_index)
    elif pixel_values is not None:
        raise ValueError("this is a text-only model; pixel_values must be None")
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask, jnp.int32)
    if mesh is not None:
        params, ids, mask, pixel_values = place_on_mesh(model, params, mesh, ids, mask,
                                                        pixel_values)
    if num_beams > 1:
        # HF fills unused beam positions with `pad_token_id or eos_token_id[0]`: a pad id
        # of 0 counts as unset there.
        beam_pad = pad if (pad or not eos) else eos[0]
        settings = (int(max_new_tokens), eos, int(beam_pad), int(num_beams),
                    float(length_penalty), early_stopping)
        fn, args = _compiled(model, settings, _beam_generate), ()
    else:
        sampling = (("do_sample", bool(do_sample)), ("temperature", float(temperature)),
                    ("top_k", int(top_k)), ("top_p", float(top_p)))
        settings = (int(max_new_tokens), eos, int(pad), sampling, stops)
        fn, args = _compiled(model, settings), (jax.random.PRNGKey(0) if rng is None else rng,)
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))  # makes the logical constraints apply
            stack.enter_context(sharding.activation_rules_context())
        out, *rest = fn(params, ids, mask, pixel_values, *args)
    # Beam search returns the best hypotheses' lengths, the loop the number of steps run.
    n = int(np.max(np.asarray(rest[0]))) if num_beams > 1 else int(rest[0])
    return np.asarray(out)[:, :n]


def place_on_mesh(model, params, mesh, input_ids, attention_mask, pixel_values=None):
    """Parameters sharded by the logical rules (as in training); prompts and images split
    over the (data, fsdp) axes when their count divides, replicated otherwise."""
    from mllm_jax.convert.hf_io import abstract_params
    params = jax.device_put(params, sharding.param_shardings(
        abstract_params(model, boxed=True), mesh))
    ways = mesh.shape["data"] * mesh.shape["fsdp"]

    def split(x):
        if x is None:
            return None
        sh = (sharding.batch_sharding(mesh, x.ndim) if x.shape[0] % ways == 0
              else sharding.replicated(mesh))
        return jax.device_put(x, sh)
    return params, split(input_ids), split(attention_mask), split(pixel_values)
