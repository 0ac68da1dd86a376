"""Decoder-only LLMs of the LLaMA family: LLaMA-1/2/3, Vicuna, Mistral, Qwen2.

Parameter paths mirror HF: `model/embed_tokens`, `model/layers_{i}/self_attn/q_proj`, ...,
`model/norm`, `lm_head` (absent when embeddings are tied).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models import attention, rope
from mllm_jax.models.layers import Dense, Embed, RMSNorm, activation, dtype_of
from mllm_jax.models.stack import LayerStack

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


class LlamaAttention(nn.Module):
    cfg: Any  # text config
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache=None):
        """With `cache` (see `write_kv_cache`), the new keys/values are written into it, the
        queries attend over the whole cache (mask: [b|1, 1, s, cache_len]) and
        (output, updated cache) is returned. `cache["prefill"]` (a Python bool: the cache
        is empty and x is the whole prompt) attends within the prompt only."""
        c = self.cfg
        b, s, _ = x.shape
        hd = c.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Dense(c.num_attention_heads * hd, ("embed", "heads"), c.qkv_bias, name="q_proj", **kw)(x)
        k = Dense(c.num_key_value_heads * hd, ("embed", "kv"), c.qkv_bias, name="k_proj", **kw)(x)
        v = Dense(c.num_key_value_heads * hd, ("embed", "kv"), c.qkv_bias, name="v_proj", **kw)(x)
        q = q.reshape(b, s, c.num_attention_heads, hd)
        k = k.reshape(b, s, c.num_key_value_heads, hd)
        v = v.reshape(b, s, c.num_key_value_heads, hd)
        q = rope.apply_rope(q, cos, sin)
        k = rope.apply_rope(k, cos, sin)
        if cache is None:
            out = attention.causal_self_attention(q, k, v, mask, scale=hd ** -0.5)
        else:
            prefill = cache.get("prefill", False)
            cache = attention.write_kv_cache(cache, k, v)
            if prefill:  # the prompt fills slots 0..s-1: causal attention within it
                out = attention.causal_self_attention(q, k, v, mask[..., :s], scale=hd ** -0.5)
            else:
                out = attention.cached_attention(q, cache["k"], cache["v"], mask,
                                                 scale=hd ** -0.5)
        out = out.reshape(b, s, c.num_attention_heads * hd)
        out = Dense(c.hidden_size, ("heads", "embed"), c.o_bias, name="o_proj", **kw)(out)
        return out if cache is None else (out, cache)


class LlamaMLP(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, name="gate_proj", **kw)(x)
        up = Dense(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, name="up_proj", **kw)(x)
        h = activation(c.hidden_act)(gate) * up
        return Dense(c.hidden_size, ("mlp", "embed"), c.mlp_bias, name="down_proj", **kw)(h)


class LlamaDecoderLayer(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache=None):
        """Returns x, or (x, updated cache) when a KV cache is given (see LlamaAttention)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        a = LlamaAttention(c, name="self_attn", **kw)(h, mask, cos, sin, cache)
        if cache is not None:
            a, cache = a
        x = x + a
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + LlamaMLP(c, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x, ACT_AXES)
        return x if cache is None else (x, cache)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm; returns the last hidden states."""

    cfg: Any  # text config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    def setup(self):
        c = self.cfg
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.inv_freq = rope.inverse_frequencies(
            c.head_dim, c.rope_theta, _plain(c.rope_scaling))
        self.stack = LayerStack(
            LlamaDecoderLayer, dict(cfg=c, dtype=self.dtype, param_dtype=self.param_dtype),
            c.num_hidden_layers, num_args=3, scan=self.scan_layers,
            remat_policy=self.remat_policy)
        nn.share_scope(self, self.stack)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, segment_ids=None, position_ids=None):
        c = self.cfg
        b, s, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        cos, sin = rope.rope_cos_sin(position_ids, self.inv_freq, self.dtype)
        mask = attention.make_attention_mask(
            s, causal=True, attention_mask=attention_mask, segment_ids=segment_ids,
            sliding_window=c.get("sliding_window"))
        x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ACT_AXES)
        x, _ = self.stack(x, mask, cos, sin)
        return self.norm(x)


def _plain(value):
    if value is None:
        return None
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


class CausalLM(nn.Module):
    """`LlamaForCausalLM` and friends: logits [batch, seq, vocab]."""

    cfg: Any  # model config with a `text` section

    def setup(self):
        c = self.cfg
        self.model = LlamaModel(c.text, dtype_of(c.dtype), dtype_of(c.param_dtype),
                                c.scan_layers, c.remat_policy)
        if not c.text.tie_word_embeddings:
            self.lm_head = Dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def decode(self, inputs_embeds, attention_mask=None, segment_ids=None, position_ids=None):
        """Final (normed) hidden states for given input embeddings."""
        return self.model(inputs_embeds, attention_mask, segment_ids, position_ids)

    def hidden_states(self, input_ids=None, pixel_values=None, attention_mask=None, *,
                      inputs_embeds=None, segment_ids=None, position_ids=None):
        """Final (normed) hidden states [b, s, d]; `logits_from_hidden` finishes the job."""
        if pixel_values is not None:
            raise ValueError("this is a text-only model; pixel_values must be None")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        return self.decode(inputs_embeds, attention_mask, segment_ids, position_ids)

    def output_head(self):
        """(weight, vocab_major) of the output projection in the compute dtype: the lm_head
        kernel [d, vocab], or the tied embedding [vocab, d]."""
        dtype = dtype_of(self.cfg.dtype)
        if self.cfg.text.tie_word_embeddings:
            return self.model.embed_tokens.embedding.astype(dtype), True
        return self.lm_head.variables["params"]["kernel"].astype(dtype), False

    def logits_from_hidden(self, h):
        if self.cfg.text.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, *,
                 inputs_embeds=None, segment_ids=None, position_ids=None):
        h = self.hidden_states(input_ids, pixel_values, attention_mask,
                               inputs_embeds=inputs_embeds, segment_ids=segment_ids,
                               position_ids=position_ids)
        return self.logits_from_hidden(h)
