"""The LLaMA-family decoder (`text.model_type` llama, mistral, qwen2): attention with
grouped-query heads, RoPE in HF's rotate-half layout, SwiGLU MLP, RMSNorm; the KV cache; the
HF config mapping (`LlamaConfig`, `MistralConfig`, `Qwen2Config`) and FLOP count.

Parameter paths mirror HF: `embed_tokens`, `layers_{i}/self_attn/q_proj`, ..., `norm`.
HF writes only the fields that differ from its config classes' defaults, so the defaults
below are transformers' (tests check them against the installed transformers).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax import config as mc
from mllm_jax.models import attention, checks, rope, splash
from mllm_jax.models.layers import Dense, Embed, RMSNorm, activation, plain_dict
from mllm_jax.models.registry import DecoderSpec, UnsupportedModelError, register_decoder
from mllm_jax.models.stack import LayerStack

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


class LlamaAttention(nn.Module):
    cfg: Any  # text config
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, cos, sin, cache=None, prefill=False):
        """`mask` is `attention.self_attention_mask`'s (dense, or segments for the Pallas
        kernel). With `cache` (see `attention.write_kv_cache`), the new keys/values are
        written into it, the queries attend over the whole cache (mask: [b|1, 1, s,
        cache_len]) and (output, updated cache) is returned. `prefill` (the cache is empty
        and x is the whole prompt) attends within the prompt only."""
        c = self.cfg
        b, s, _ = x.shape
        hd = c.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Dense(c.num_attention_heads * hd, ("embed", "heads"), c.qkv_bias, name="q_proj",
                  **kw)(x)
        k = Dense(c.num_key_value_heads * hd, ("embed", "kv"), c.qkv_bias, name="k_proj", **kw)(x)
        v = Dense(c.num_key_value_heads * hd, ("embed", "kv"), c.qkv_bias, name="v_proj", **kw)(x)
        q = q.reshape(b, s, c.num_attention_heads, hd)
        k = k.reshape(b, s, c.num_key_value_heads, hd)
        v = v.reshape(b, s, c.num_key_value_heads, hd)
        q = rope.apply_rope(q, cos, sin)
        k = rope.apply_rope(k, cos, sin)
        if cache is None:
            out = attention.self_attention(q, k, v, mask, scale=hd ** -0.5)
        else:
            cache = attention.write_kv_cache(cache, k, v)
            if prefill:  # the prompt fills slots 0..s-1: causal attention within it
                out = attention.self_attention(q, k, v, mask, scale=hd ** -0.5)
            else:
                keys, values = attention.cached_kv(cache)
                out = attention.cached_attention(q, keys, values, mask, scale=hd ** -0.5)
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
    def __call__(self, x, mask, cos, sin, cache=None, prefill=False):
        """Returns x, or (x, updated cache) when a KV cache is given (see LlamaAttention)."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        a = LlamaAttention(c, name="self_attn", **kw)(h, mask, cos, sin, cache, prefill)
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
    attention: str = "xla"  # model.attention: xla | splash | auto | splash_interpret

    def setup(self):
        c = self.cfg
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.inv_freq = rope.inverse_frequencies(
            c.head_dim, c.rope_theta, plain_dict(c.rope_scaling))
        self.stack = LayerStack(
            LlamaDecoderLayer, dict(cfg=c, dtype=self.dtype, param_dtype=self.param_dtype),
            c.num_hidden_layers, num_args=3, scan=self.scan_layers,
            remat_policy=self.remat_policy)
        nn.share_scope(self, self.stack)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def embedding_table(self):
        """The input embedding [vocab, d] (the output head when tied)."""
        return self.embed_tokens.embedding

    def attend(self, h):
        """Logits of hidden states against the input embedding (tied output head)."""
        return self.embed_tokens.attend(h)

    def __call__(self, inputs_embeds, attention_mask=None, segment_ids=None, position_ids=None,
                 *, cache=None, kv_mask=None, prefill=False):
        """Final normed hidden states [b, s, d]. With a KV cache (`init_cache`): the tokens
        are written at slots index..index+s-1, `kv_mask` [b, max_len] is 1 where a slot holds
        (or will hold) a real token, and (hidden states, updated cache) is returned.
        Whole sequences (no cache, or `prefill`) go through the `attention` implementation;
        decoding over a cache always through XLA. `position_ids` [3, b, s] are M-RoPE
        positions (temporal, height, width), for a text config with `mrope_section`."""
        c = self.cfg
        b, s, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        if position_ids.ndim == 3:  # M-RoPE positions [3, b, s] (text.mrope_section)
            cos, sin = rope.mrope_cos_sin(position_ids, self.inv_freq, c.mrope_section,
                                          self.dtype)
        else:
            cos, sin = rope.rope_cos_sin(position_ids, self.inv_freq, self.dtype)
        x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ACT_AXES)
        window = c.get("sliding_window")
        # Parameters do not depend on the attention implementation: init takes the XLA
        # path, so a model's shapes trace on any host (a TPU model's on a laptop).
        implementation = "xla" if self.is_initializing() else splash.resolve(self.attention)
        if cache is None:
            mask = attention.self_attention_mask(
                implementation, s, attention_mask=attention_mask, segment_ids=segment_ids,
                sliding_window=window)
            x, _ = self.stack(x, mask, cos, sin)
            return self.norm(x)
        max_len = kv_mask.shape[1]
        index = cache["index"]
        if prefill and implementation != "xla":
            mask = attention.self_attention_mask(implementation, s, attention_mask=kv_mask[:, :s],
                                                 sliding_window=window)
        else:
            mask = attention.make_attention_mask(
                s, max_len, causal=True, attention_mask=kv_mask, sliding_window=window,
                q_offset=index - (max_len - s))
        x, cache = self.stack(x, mask, cos, sin, cache=cache, prefill=prefill)
        return self.norm(x), {**cache, "index": index + s}


def init_cache(c, batch: int, max_len: int, dtype, scan_layers: bool) -> dict:
    """An empty KV cache for text config `c`: keys/values [batch, kv_heads, max_len,
    head_dim] per layer (a list when unrolled, stacked on a leading layer axis when scanned)
    and the shared write index. Under a mesh and the rules context it is split like the
    activations: batch over the data axes, KV heads over the tensor axis."""
    one = attention.init_kv_cache(batch, max_len, c.num_key_value_heads, c.head_dim, dtype)
    n = c.num_hidden_layers
    names = ("activation_batch", "activation_kv_heads", "activation_length", None)
    # Every array its own buffer, so that a concrete cache can be donated to a jitted step.
    if scan_layers:
        def stacked():
            return nn.with_logical_constraint(jnp.zeros((n, *one["k"].shape), dtype),
                                              (None, *names))
        return {"k": stacked(), "v": stacked(), "index": one["index"]}

    def layer():
        return nn.with_logical_constraint(jnp.zeros(one["k"].shape, dtype), names)
    return {"k": [layer() for _ in range(n)], "v": [layer() for _ in range(n)],
            "index": one["index"]}


def reorder_cache(cache, rows, scan_layers: bool):
    """The cache with its batch rows gathered by `rows` (beam search)."""
    axis = 1 if scan_layers else 0  # scanned stacks carry a leading layer axis
    take = lambda x: jnp.take(x, rows, axis=axis)  # noqa: E731
    if scan_layers:
        return {**cache, "k": take(cache["k"]), "v": take(cache["v"])}
    return {**cache, "k": [take(x) for x in cache["k"]], "v": [take(x) for x in cache["v"]]}


def text_forward_flops(t, seq: int) -> float:
    """Matmul FLOPs of one sequence of `seq` tokens, output projection included."""
    d, hd = t.hidden_size, t.head_dim
    q = t.num_attention_heads * hd
    kv = t.num_key_value_heads * hd
    per_layer = (2 * seq * d * (2 * q + 2 * kv) + 2 * seq * 3 * d * t.intermediate_size
                 + 2 * 2 * seq * seq * q)
    return t.num_hidden_layers * per_layer + 2 * seq * d * t.vocab_size


def text_attention_flops(t, seq: int) -> float:
    """The scores and weighted values within `text_forward_flops` (the full square)."""
    return t.num_hidden_layers * 2 * 2 * seq * seq * t.num_attention_heads * t.head_dim


TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None),
}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def _rope(hf: dict):
    """(theta, scaling) from either the v4 fields (rope_theta, rope_scaling) or v5's
    `rope_parameters`."""
    params = hf.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", "default")
        scaling = None if rope_type == "default" else {
            k: v for k, v in params.items() if k != "rope_theta"}
        return theta, scaling
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return hf.get("rope_theta", 10000.0), scaling


TEXT_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_text(t, where: str = "text config") -> None:
    """The decoder's constraints on a text config (or a dict of its fields): positive
    integer sizes, a sane layer count, KV heads dividing the query heads, positive epsilon
    and RoPE base, token ids that are ids."""
    for name in TEXT_INT_FIELDS:
        checks.positive_int(t, name, where)
    checks.layer_count(t, "num_hidden_layers", where)
    checks.divides(t, "num_key_value_heads", "num_attention_heads", where)
    checks.positive_number(t, "rms_norm_eps", where)
    checks.positive_number(t, "rope_theta", where)
    checks.optional_positive_int(t, "sliding_window", where)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        checks.token_id(t, name, where)


def text_from_hf(hf: dict, where: str = "config.json"):
    model_type = hf.get("model_type", "llama")
    if model_type not in TEXT_DEFAULTS:
        raise UnsupportedModelError(
            f"{where}: text model_type {model_type!r} is not supported "
            f"(supported: {sorted(TEXT_DEFAULTS)})")
    d = dict(TEXT_DEFAULTS[model_type])
    d.update({k: hf[k] for k in d if k in hf})
    heads = checks.positive_int(d, "num_attention_heads", where)
    kv = hf.get("num_key_value_heads") or d.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim")
    if not head_dim:
        # Derived from the width, which the heads must then split evenly. (A config that
        # gives head_dim may have heads * head_dim != hidden_size, as Mistral-Nemo does.)
        checks.positive_int(d, "hidden_size", where)
        checks.divides(d, "num_attention_heads", "hidden_size", where)
        head_dim = d["hidden_size"] // heads
    theta, scaling = _rope(hf)
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{where}: qwen2 with use_sliding_window=true is not "
                                        "supported")
        d["sliding_window"] = None
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        rms_norm_eps=d["rms_norm_eps"], rope_theta=theta,
        max_position_embeddings=d["max_position_embeddings"],
        sliding_window=d["sliding_window"],
        bos_token_id=hf.get("bos_token_id", 1), eos_token_id=_first(hf.get("eos_token_id", 2)),
        pad_token_id=hf.get("pad_token_id"))
    check_text(fields, where)  # before anything is built from the values
    if scaling is not None:
        from mllm_jax.models.rope import inverse_frequencies
        try:  # rejects unsupported rope types early
            inverse_frequencies(head_dim, float(theta), scaling)
        except (ValueError, KeyError) as e:
            raise UnsupportedModelError(f"{where}: {e}") from None
    fields.update(rms_norm_eps=float(fields["rms_norm_eps"]),
                  rope_theta=float(fields["rope_theta"]))
    return mc.text_config(
        model_type=model_type, **fields,
        hidden_act=hf.get("hidden_act", "silu"), rope_scaling=scaling,
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def text_to_hf(t) -> dict:
    hf = {
        "model_type": t.model_type,
        "architectures": [ARCHITECTURES[t.model_type]],
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim,
        "hidden_act": t.hidden_act, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": plain_dict(t.rope_scaling),
        "max_position_embeddings": t.max_position_embeddings,
        "mlp_bias": t.mlp_bias, "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    if t.model_type == "qwen2":
        if not t.qkv_bias or t.o_bias:
            raise UnsupportedModelError("qwen2 has biases on q/k/v and none on o_proj")
        hf["use_sliding_window"] = False
    else:
        if t.qkv_bias != t.o_bias:
            raise UnsupportedModelError(
                f"{t.model_type} in HF has attention_bias for all of q/k/v/o or none; this "
                f"config has qkv_bias={t.qkv_bias}, o_bias={t.o_bias}")
        hf["attention_bias"] = t.qkv_bias
    if t.model_type == "mistral":
        hf["sliding_window"] = t.sliding_window
    return hf



for _name in TEXT_DEFAULTS:
    register_decoder(_name, DecoderSpec(
        module=LlamaModel, config=lambda _n=_name, **kw: mc.text_config(model_type=_n, **kw),
        init_cache=init_cache, reorder_cache=reorder_cache, flops=text_forward_flops,
        attention_flops=text_attention_flops,
        from_hf=text_from_hf, to_hf=text_to_hf, check=check_text))
