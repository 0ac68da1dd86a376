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
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
    if model.cfg.scan_layers:
        k = jnp.broadcast_to(one["k"][None], (n, *one["k"].shape))
        return {"k": k, "v": k, "index": one["index"]}
    return {"k": [one["k"]] * n, "v": [one["v"]] * n, "index": one["index"]}


def forward_cached(model, params, embeds, positions, kv_mask, cache: Cache):
    """Runs the decoder over `embeds` [b, s, d] written at cache slots index..index+s-1.

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
        x, new = layer.apply({"params": lp}, x, mask, cos, sin, {"k": k, "v": v, "index": index})
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
    cache slots. Returns (logits of the last prompt slot [b, vocab], cache, positions of the
    last prompt token [b])."""
    if model.cfg.model_type == "llava":
        embeds = model.apply({"params": params}, input_ids, pixel_values, method="embed")
    else:
        embeds = model.apply({"params": params}, input_ids, method="embed")
    s = input_ids.shape[1]
    max_len = cache["k"][0].shape[-3]
    positions = jnp.cumsum(attention_mask, axis=1) - 1
    positions = jnp.where(attention_mask == 0, 0, positions).astype(jnp.int32)
    kv_mask = _kv_mask(attention_mask, max_len)
    h, cache = forward_cached(model, params, embeds, positions, kv_mask, cache)
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

def _generate(model, settings, params, input_ids, attention_mask, pixel_values, rng):
    max_new, eos_ids, pad_id, sampling = settings
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
        finished = finished | jnp.isin(tok, eos)
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


_COMPILED = {}  # (id(model), settings) -> (model, jitted fn); the model is kept alive


def _compiled(model, settings):
    key = (id(model), settings)
    if key not in _COMPILED:
        _COMPILED[key] = (model, jax.jit(partial(_generate, model, settings)))
    return _COMPILED[key][1]


def generate(model, params, input_ids, attention_mask=None, pixel_values=None, *,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None,
             pad_token_id: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng=None) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens per prompt. Returns int32 [b, n] (new tokens
    only); n < max_new_tokens when every sample emitted an EOS earlier. After its EOS a
    sample holds `pad_token_id` (default: the first EOS id), as HF `generate` does.

    input_ids: [b, s] prompts, LEFT padded; attention_mask: [b, s] (1 = real token; None =
    no padding). pixel_values (LLaVA): NHWC [n_images, h, w, c], images in the order their
    (already expanded) image tokens appear in the flattened batch, any number per prompt.
    Sampling: do_sample=False is greedy; otherwise temperature, top_k (0 = off), top_p
    (1.0 = off) as HF applies them, drawn from `rng` (a jax PRNG key; default key 0).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask)
    if np.any(attention_mask[:, -1] == 0):
        raise ValueError("prompts must be LEFT padded (attention_mask[:, -1] == 1 for all)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if model.cfg.model_type == "llava":
        if pixel_values is not None:
            pixel_values = jnp.asarray(pixel_values)
            feats = jax.eval_shape(
                lambda p, px: model.apply({"params": p}, px, method="image_features"),
                params, pixel_values)
            check_image_tokens(input_ids, feats.shape[0], feats.shape[1],
                               model.cfg.image_token_index)
    elif pixel_values is not None:
        raise ValueError("this is a text-only model; pixel_values must be None")
    sampling = (("do_sample", bool(do_sample)), ("temperature", float(temperature)),
                ("top_k", int(top_k)), ("top_p", float(top_p)))
    settings = (int(max_new_tokens), eos, int(pad), sampling)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out, n = _compiled(model, settings)(params, jnp.asarray(input_ids, jnp.int32),
                                        jnp.asarray(attention_mask, jnp.int32),
                                        pixel_values, rng)
    return np.asarray(out)[:, :int(n)]
