"""T5 (`text.model_type` t5): an encoder-decoder language model, as HF's
`T5ForConditionalGeneration` computes it (T5 v1.0, v1.1, Flan-T5).

What sets it apart from the decoder-only families: attention scores are not scaled by
1/sqrt(head_dim) and get a learned bias per head and relative-position bucket instead (one
table per stack, in its first layer, bidirectional in the encoder and causal in the
decoder); RMS norms without bias ("T5LayerNorm"); no biases anywhere; a gated-GELU (or ReLU)
feed-forward; heads * head_dim may differ from the width; the decoder cross-attends to the
encoder's output. Parameter paths mirror HF: `shared`, `encoder/block_{i}/layer_0/
SelfAttention/q`, ..., `decoder/block_{i}/layer_1/EncDecAttention/k`, `lm_head`.

Generation (`infer.generate` loops over it like any language model): `prefill` runs the
encoder once over the (left padded) prompt, stores every decoder layer's cross-attention
keys/values and the prompt's mask in the cache, and runs the decoder on the start token;
each `decode_step` runs the decoder on one token against its self-attention KV cache.
Relative positions make left padding harmless: a real token sees the same distances to
the other real tokens as with right padding.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import attention, registry
from mllm_jax.models.decoders import t5_config
from mllm_jax.models.layers import Dense, Embed, RMSNorm, activation, dtype_of
from mllm_jax.models.registry import DecoderSpec, ModelFamily, UnsupportedModelError
from mllm_jax.models.stack import remat_block

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")
CACHE_AXES = ("activation_batch", "activation_kv_heads", "activation_length", None)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """HF's bucketing of key - query distances: exact buckets for the nearest half, then
    logarithmically wider ones up to `max_distance`; the encoder splits the buckets by
    direction, the decoder sees only the past (later keys share bucket 0)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # float32 throughout, as torch computes it; the log of 0 is never selected.
    ratio = jnp.maximum(relative_position, 1).astype(jnp.float32) / jnp.float32(max_exact)
    large = max_exact + (jnp.log(ratio) / jnp.float32(jnp.log(max_distance / max_exact))
                         * jnp.float32(num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


def attend(q, k, v, mask, bias):
    """q [b, q, h, d]; k, v [b, h, kv, d]; mask (bool, None: all keys) broadcastable to
    [b, 1, q, kv]; bias [1|b, h, q, kv] or None. Unscaled scores plus the bias, softmax in
    float32 -> [b, q, h*d]."""
    scores = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", weights, v)
    return out.reshape(*out.shape[:2], -1)


class T5Attention(nn.Module):
    cfg: Any  # text config
    relative_bias: bool = False  # holds the stack's position-bias table (first layer)
    bidirectional: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        inner = c.num_attention_heads * c.head_dim
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q = Dense(inner, ("embed", "heads"), **kw)
        self.k = Dense(inner, ("embed", "heads"), **kw)
        self.v = Dense(inner, ("embed", "heads"), **kw)
        self.o = Dense(c.hidden_size, ("heads", "embed"), **kw)
        if self.relative_bias:
            # [buckets, heads]: a few thousand numbers, replicated.
            self.relative_attention_bias = Embed(
                c.relative_attention_num_buckets, c.num_attention_heads, axes=(None, None),
                dtype=jnp.float32, param_dtype=self.param_dtype)

    def position_bias(self, q_len: int, k_len: int, q_offset=0):
        """[1, heads, q_len, k_len] float32: queries at positions q_offset + 0..q_len-1,
        keys at 0..k_len-1."""
        c = self.cfg
        q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + q_offset
        rel = jnp.arange(k_len, dtype=jnp.int32)[None, :] - q_pos
        buckets = relative_position_bucket(rel, self.bidirectional,
                                           c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def project_kv(self, x):
        """Keys and values of x [b, s, d] in the cache layout [b, heads, s, head_dim]."""
        b, s, _ = x.shape
        split = lambda y: y.reshape(b, s, self.cfg.num_attention_heads,  # noqa: E731
                                    self.cfg.head_dim).transpose(0, 2, 1, 3)
        return split(self.k(x)), split(self.v(x))

    def __call__(self, x, mask, bias, kv=None, cache=None):
        """Self-attention over x (kv None), writing its keys/values into `cache` when given
        (see `attention.write_kv_cache`: slots index..index+s-1; the queries then read the
        whole cache), or cross-attention over precomputed kv = (keys, values). Returns
        (output, cache)."""
        c = self.cfg
        b, s, _ = x.shape
        q = self.q(x).reshape(b, s, c.num_attention_heads, c.head_dim)
        if kv is None:
            k, v = self.project_kv(x)
            if cache is not None:
                cache = attention.write_kv_cache(cache, k.transpose(0, 2, 1, 3),
                                                 v.transpose(0, 2, 1, 3))
                k, v = cache["k"], cache["v"]
        else:
            k, v = kv
        return self.o(attend(q, k, v, mask, bias)), cache


class T5LayerSelfAttention(nn.Module):
    cfg: Any
    relative_bias: bool
    bidirectional: bool
    dtype: Any
    param_dtype: Any

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.SelfAttention = T5Attention(self.cfg, self.relative_bias, self.bidirectional, **kw)
        self.layer_norm = RMSNorm(self.cfg.layer_norm_epsilon, **kw)

    def __call__(self, x, mask, bias, cache=None):
        out, cache = self.SelfAttention(self.layer_norm(x), mask, bias, cache=cache)
        return x + out, cache


class T5LayerCrossAttention(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.EncDecAttention = T5Attention(self.cfg, **kw)
        self.layer_norm = RMSNorm(self.cfg.layer_norm_epsilon, **kw)

    def __call__(self, x, kv, mask):
        out, _ = self.EncDecAttention(self.layer_norm(x), mask, None, kv=kv)
        return x + out


class T5DenseReluDense(nn.Module):
    """HF's T5DenseActDense (`wi`) or, gated, T5DenseGatedActDense (`wi_0`, `wi_1`)."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        act_name, gated = t5_config.feed_forward(c)
        act = activation(act_name)
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        if gated:
            h = act(Dense(c.intermediate_size, ("embed", "mlp"), name="wi_0", **kw)(x))
            h = h * Dense(c.intermediate_size, ("embed", "mlp"), name="wi_1", **kw)(x)
        else:
            h = act(Dense(c.intermediate_size, ("embed", "mlp"), name="wi", **kw)(x))
        return Dense(c.hidden_size, ("mlp", "embed"), name="wo", **kw)(h)


class T5LayerFF(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.DenseReluDense = T5DenseReluDense(self.cfg, **kw)
        self.layer_norm = RMSNorm(self.cfg.layer_norm_epsilon, **kw)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """`layer_0` self-attention, (decoder) `layer_1` cross-attention, then the feed-forward."""

    cfg: Any
    is_decoder: bool
    relative_bias: bool
    dtype: Any
    param_dtype: Any

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        layers = [T5LayerSelfAttention(self.cfg, self.relative_bias, not self.is_decoder, **kw)]
        if self.is_decoder:
            layers.append(T5LayerCrossAttention(self.cfg, **kw))
        self.layer = layers + [T5LayerFF(self.cfg, **kw)]

    def cross_kv(self, encoder_hidden):
        return self.layer[1].EncDecAttention.project_kv(encoder_hidden)

    def position_bias(self, q_len, k_len, q_offset=0):
        return self.layer[0].SelfAttention.position_bias(q_len, k_len, q_offset)

    def __call__(self, x, mask, bias, cross_kv=None, cross_mask=None, cache=None):
        x, cache = self.layer[0](x, mask, bias, cache)
        if self.is_decoder:
            x = self.layer[1](x, cross_kv, cross_mask)
        x = nn.with_logical_constraint(self.layer[-1](x), ACT_AXES)
        return x, cache


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks (the first holds the position-bias table every
    block uses) and the final norm. Takes input embeddings; the embedding table is the
    model's `shared`."""

    cfg: Any
    is_decoder: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        c = self.cfg
        n = c.num_decoder_layers if self.is_decoder else c.num_hidden_layers
        block_cls = remat_block(T5Block, self.remat_policy)
        self.block = [block_cls(c, self.is_decoder, i == 0, dtype=self.dtype,
                                param_dtype=self.param_dtype) for i in range(n)]
        self.final_layer_norm = RMSNorm(c.layer_norm_epsilon, dtype=self.dtype,
                                        param_dtype=self.param_dtype)

    def cross_kv(self, encoder_hidden):
        """Every decoder layer's cross-attention (keys, values) of the encoder output."""
        return [blk.cross_kv(encoder_hidden) for blk in self.block]

    def __call__(self, x, attention_mask=None, *, encoder_hidden=None, cross_kv=None,
                 cross_mask=None, cache=None):
        """Final normed hidden states [b, s, d] of input embeddings x; with a decoder
        `cache` (`init_cache`, after `prefill` stored cross_k/cross_v/encoder_mask), the
        tokens are written at slots index..index+s-1 and (hidden states, cache) returned."""
        b, s, _ = x.shape
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_AXES)
        if cache is None:
            mask = attention.make_attention_mask(s, causal=self.is_decoder,
                                                 attention_mask=attention_mask)
            bias = self.block[0].position_bias(s, s)
            if self.is_decoder and cross_kv is None:
                cross_kv = self.cross_kv(encoder_hidden)
            if cross_mask is not None:
                cross_mask = cross_mask.astype(bool)[:, None, None, :]
            for i, blk in enumerate(self.block):
                x, _ = blk(x, mask, bias, None if cross_kv is None else cross_kv[i], cross_mask)
            return self.final_layer_norm(x)
        index, max_len = cache["index"], cache["k"][0].shape[2]
        mask = attention.make_attention_mask(s, max_len, causal=True,
                                             q_offset=index - (max_len - s))
        bias = self.block[0].position_bias(s, max_len, index)
        cross_mask = cache["encoder_mask"].astype(bool)[:, None, None, :]
        ks, vs = [], []
        for i, blk in enumerate(self.block):
            layer = {"k": cache["k"][i], "v": cache["v"][i], "index": index}
            kv = (cache["cross_k"][i], cache["cross_v"][i])
            x, layer = blk(x, mask, bias, kv, cross_mask, cache=layer)
            ks.append(layer["k"])
            vs.append(layer["v"])
        return self.final_layer_norm(x), {**cache, "k": ks, "v": vs, "index": index + s}


class T5ForConditionalGeneration(nn.Module):
    """Decoder logits [b, t, vocab] for encoder inputs and decoder inputs; decodes itself
    (`init_cache`, `prefill`, `decode_step`, `reorder_cache`) for `infer.generate`."""

    cfg: Any  # model config with a `text` section (`t5_config.t5_text_config`)

    def setup(self):
        c, t = self.cfg, self.cfg.text
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        self.shared = Embed(t.vocab_size, t.hidden_size, init_std=1.0, **kw)
        self.encoder = T5Stack(t, False, remat_policy=c.remat_policy, **kw)
        self.decoder = T5Stack(t, True, remat_policy=c.remat_policy, **kw)
        if not t.tie_word_embeddings:
            self.lm_head = Dense(t.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

    def embed(self, input_ids):
        """The shared token embeddings (encoder and decoder inputs alike)."""
        return self.shared(input_ids)

    def encode(self, input_ids=None, attention_mask=None, *, inputs_embeds=None):
        """The encoder's final hidden states [b, s, d]."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        return self.encoder(inputs_embeds, attention_mask)

    def _start_tokens(self, batch):
        return jnp.full((batch, 1), self.cfg.text.decoder_start_token_id, jnp.int32)

    def hidden_states(self, input_ids=None, pixel_values=None, attention_mask=None, *,
                      inputs_embeds=None, decoder_input_ids=None, decoder_attention_mask=None):
        """The decoder's final hidden states [b, t, d], scaled by hidden_size ** -0.5 where
        the config says so: `logits_from_hidden` (or `output_head`) finishes the job.
        decoder_input_ids None: the start token alone."""
        if pixel_values is not None:
            raise ValueError("this is a text-only model; pixel_values must be None")
        enc = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds)
        if decoder_input_ids is None:
            decoder_input_ids = self._start_tokens(enc.shape[0])
        h = self.decoder(self.embed(decoder_input_ids), decoder_attention_mask,
                         encoder_hidden=enc, cross_mask=attention_mask)
        return self._scale(h)

    def _scale(self, h):
        t = self.cfg.text
        return h * (t.hidden_size ** -0.5) if t.scale_decoder_outputs else h

    def output_head(self):
        """(weight, vocab_major) of the output projection in the compute dtype."""
        dtype = dtype_of(self.cfg.dtype)
        if self.cfg.text.tie_word_embeddings:
            return self.shared.embedding.astype(dtype), True
        return self.lm_head.variables["params"]["kernel"].astype(dtype), False

    def logits_from_hidden(self, h):
        if self.cfg.text.tie_word_embeddings:
            return self.shared.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, *,
                 inputs_embeds=None, decoder_input_ids=None, decoder_attention_mask=None):
        h = self.hidden_states(input_ids, pixel_values, attention_mask,
                               inputs_embeds=inputs_embeds, decoder_input_ids=decoder_input_ids,
                               decoder_attention_mask=decoder_attention_mask)
        return self.logits_from_hidden(h)

    # ---- decoding: see `infer.generate` for the loop ----------------------------------------

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int) -> dict:
        """The decoder's empty self-attention cache of `max_len` slots (the generic loop
        asks for prompt + new tokens; the decoder needs the new ones); `prefill` adds the
        encoder side."""
        return init_cache(self.cfg.text, batch, max_len, dtype_of(self.cfg.dtype), False)

    @nn.nowrap
    def reorder_cache(self, cache, rows) -> dict:
        return reorder_cache(cache, rows, False)

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None, *,
                inputs_embeds=None):
        """Encodes the (left padded) prompt once, stores each decoder layer's cross-attention
        keys/values (`cross_k`, `cross_v`) and the prompt's mask (`encoder_mask`) in the
        cache, and decodes the start token. Returns (float32 logits [b, vocab], cache,
        decoder positions [b] (zeros: the start token's; T5 counts them itself))."""
        if pixel_values is not None:
            raise ValueError("this is a text-only model; pixel_values must be None")
        enc = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds)
        b, s, _ = enc.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        kv = self.decoder.cross_kv(enc)
        pin = lambda x: nn.with_logical_constraint(x, CACHE_AXES)  # noqa: E731
        cache = {**cache, "cross_k": [pin(k) for k, _ in kv], "cross_v": [pin(v) for _, v in kv],
                 "encoder_mask": attention_mask.astype(jnp.int32)}
        logits, cache = self._decode_cached(self._start_tokens(b), cache)
        return logits, cache, jnp.zeros((b,), jnp.int32)

    def decode_step(self, tokens, positions, kv_mask, cache):
        """One decoder token per sample [b] against the cache. `positions` and `kv_mask`
        (the generic loop's, for RoPE decoders) are not needed: the decoder's positions
        are its cache index, and every decoder token is real. Returns (float32 logits
        [b, vocab], cache)."""
        del positions, kv_mask
        return self._decode_cached(tokens[:, None], cache)

    def _decode_cached(self, tokens, cache):
        h, cache = self.decoder(self.embed(tokens), cache=cache)
        return self.logits_from_hidden(self._scale(h[:, -1])).astype(jnp.float32), cache


def init_cache(t, batch: int, max_len: int, dtype, scan_layers: bool = False) -> dict:
    """The decoder's self-attention keys/values [batch, heads, max_len, head_dim] per layer
    and the write index. `prefill` adds, per layer, the cross-attention `cross_k`/`cross_v`
    [batch, heads, prompt_len, head_dim] and the prompt's `encoder_mask` [batch, prompt_len].
    T5's stacks are never scanned (their first layers hold the position-bias tables)."""
    del scan_layers

    def layer():
        shape = (batch, t.num_attention_heads, max_len, t.head_dim)
        return nn.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES)
    n = t.num_decoder_layers
    return {"k": [layer() for _ in range(n)], "v": [layer() for _ in range(n)],
            "index": jnp.zeros((), jnp.int32)}


def reorder_cache(cache, rows, scan_layers: bool = False):
    """Every batch-leading array of the cache gathered by `rows` (beam search)."""
    del scan_layers
    take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
    out = dict(cache)
    for name in ("k", "v", "cross_k", "cross_v"):
        if name in cache:
            out[name] = [take(x) for x in cache[name]]
    if "encoder_mask" in cache:
        out["encoder_mask"] = take(cache["encoder_mask"])
    return out


def unused_keys(t, prefix: str = "") -> list:
    """Checkpoint keys a T5 language model under `prefix` (e.g. "language_model.") reads
    past: the stacks' copies of the shared embeddings, the tied head when stored, and the
    unused cross-attention bias table of old checkpoints."""
    p = r"(^|\.)" + re.escape(prefix)
    keys = [p + r"(encoder|decoder)\.embed_tokens\.weight$",
            p + r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"]
    if t.tie_word_embeddings:
        keys.append(p + r"lm_head\.weight$")
    return keys


def _no_decoder_only(*args, **kwargs):
    raise UnsupportedModelError(
        "t5 is an encoder-decoder model, not a decoder-only stack: build its language model "
        "with registry.language_model(cfg) (T5ForConditionalGeneration), or load a "
        "T5ForConditionalGeneration directory as model_type seq2seq_lm")


registry.register_decoder("t5", DecoderSpec(
    module=_no_decoder_only, config=t5_config.t5_text_config, init_cache=init_cache,
    reorder_cache=reorder_cache, flops=t5_config.text_forward_flops,
    from_hf=t5_config.text_from_hf, to_hf=t5_config.text_to_hf,
    check=t5_config.check_text, language_model=T5ForConditionalGeneration,
    unused_keys=unused_keys))


# ---- the encoder-decoder LM on its own (`model_type` seq2seq_lm) -------------------------

def _seq2seq_decoders():
    return tuple(n for n, d in registry.DECODERS.items()
                 if d.language_model is not None and d.from_hf is not None)


def _check(cfg, where: str = "model config") -> None:
    check = registry.DECODERS.get(cfg.text.model_type).check
    if check is not None:
        check(cfg.text, where)


def _from_hf(hf: dict, where: str = "config.json"):
    return t5_config.seq2seq_config(registry.DECODERS.get(hf.get("model_type")).from_hf(hf, where))


def _to_hf(cfg) -> dict:
    return registry.DECODERS.get(cfg.text.model_type).to_hf(cfg.text)


def _train_flops(cfg, batch, seq, images_per_sample, trainable) -> float:
    del images_per_sample
    fwd = registry.DECODERS.get(cfg.text.model_type).flops(cfg.text, seq) * batch
    return fwd * (1 + int(bool(trainable)))


registry.register_model("seq2seq_lm", ModelFamily(
    module=lambda cfg: registry.language_model(cfg), config=t5_config.seq2seq_config,
    init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
    hf_model_types=_seq2seq_decoders, from_hf=_from_hf, to_hf=_to_hf,
    unused_keys=lambda cfg: registry.DECODERS.get(cfg.text.model_type).unused_keys(cfg.text, ""),
    train_flops=_train_flops, check=_check))
