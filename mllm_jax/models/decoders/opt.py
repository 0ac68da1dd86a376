"""The OPT decoder (`text.model_type` opt): learned absolute positions with OPT's offset of
2, multi-head attention with biases, a ReLU MLP (`fc1`, `fc2`), LayerNorm before (125m,
1.3b, 2.7b, ...) or after (350m) each block, and the optional `project_in` / `project_out`
between the word-embedding width (`word_embed_proj_dim`) and the hidden width; the KV cache
(LLaMA's layout); the HF config mapping (`OPTConfig`) and FLOP count.

Parameter paths mirror HF's `OPTForCausalLM`: under `CausalLM` the decoder is `model`, so
`model/decoder/embed_tokens`, `model/decoder/embed_positions`, `model/decoder/layers_{i}/
self_attn/q_proj`, ..., `model/decoder/final_layer_norm`, and `lm_head` when untied.
HF writes only the fields that differ from `OPTConfig`'s defaults, so the defaults below are
transformers' (a test checks them against the installed transformers).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mllm_jax.models import attention, checks, splash
from mllm_jax.models.decoders import llama
from mllm_jax.models.layers import ACTIVATIONS, Dense, Embed, activation, with_axes
from mllm_jax.models.registry import (DecoderSpec, InvalidConfigError, UnsupportedModelError,
                                      register_decoder)
from mllm_jax.models.stack import LayerStack

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")
# OPT's position table has two rows before position 0 (fairseq reserved them for padding);
# HF keeps the offset, so position p reads row p + 2.
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default, which OPT uses everywhere

# transformers' OPTConfig defaults (facebook/opt-125m's shape). `_remove_final_layer_norm`
# is ours without the underscore.
OPT_DEFAULTS = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                    max_position_embeddings=2048, do_layer_norm_before=True,
                    remove_final_layer_norm=False, word_embed_proj_dim=None,
                    num_attention_heads=12, activation_function="relu", enable_bias=True,
                    layer_norm_elementwise_affine=True, tie_word_embeddings=True,
                    bos_token_id=2, eos_token_id=2, pad_token_id=1)
HF_NAMES = {"remove_final_layer_norm": "_remove_final_layer_norm"}


def opt_text_config(**overrides) -> ml_collections.ConfigDict:
    """An OPT decoder config. Defaults are OPTConfig's (OPT-125m); `word_embed_proj_dim`
    defaults to `hidden_size`."""
    c = ml_collections.ConfigDict()
    c.model_type = "opt"
    for k, v in OPT_DEFAULTS.items():
        if k == "word_embed_proj_dim":
            continue
        c[k] = ml_collections.FieldReference(v, field_type=int) if k.endswith("token_id") else v
    c.word_embed_proj_dim = ml_collections.FieldReference(None, field_type=int)
    c.update(overrides)
    if c.word_embed_proj_dim is None:
        c.word_embed_proj_dim = c.hidden_size
    return c


class OPTLayerNorm(nn.Module):
    """torch LayerNorm (eps 1e-5), computed in float32; without parameters when the config
    says `layer_norm_elementwise_affine=False`."""

    affine: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True)
                                        + LAYER_NORM_EPS)
        if self.affine:
            d = x.shape[-1]
            scale = self.param("scale", with_axes(nn.initializers.ones, ("embed",)), (d,),
                               self.param_dtype)
            bias = self.param("bias", with_axes(nn.initializers.zeros, ("embed",)), (d,),
                              self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class OPTAttention(nn.Module):
    cfg: Any  # text config
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, cache=None, prefill=False):
        """As `LlamaAttention` without RoPE: with `cache`, returns (output, updated cache)."""
        c = self.cfg
        b, s, _ = x.shape
        heads = c.num_attention_heads
        hd = c.hidden_size // heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(name, axes):
            return Dense(c.hidden_size, axes, c.enable_bias, name=name, **kw)
        q = proj("q_proj", ("embed", "heads"))(x).reshape(b, s, heads, hd)
        k = proj("k_proj", ("embed", "kv"))(x).reshape(b, s, heads, hd)
        v = proj("v_proj", ("embed", "kv"))(x).reshape(b, s, heads, hd)
        scale = hd ** -0.5
        if cache is None:
            out = attention.self_attention(q, k, v, mask, scale=scale)
        else:
            cache = attention.write_kv_cache(cache, k, v)
            if prefill:  # the prompt fills slots 0..s-1: causal attention within it
                out = attention.self_attention(q, k, v, mask, scale=scale)
            else:
                keys, values = attention.cached_kv(cache)
                out = attention.cached_attention(q, keys, values, mask, scale=scale)
        out = proj("out_proj", ("heads", "embed"))(out.reshape(b, s, heads * hd))
        return out if cache is None else (out, cache)


class OPTDecoderLayer(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, cache=None, prefill=False):
        """Returns x, or (x, updated cache) when a KV cache is given."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pre = c.do_layer_norm_before
        attn_norm = OPTLayerNorm(c.layer_norm_elementwise_affine, name="self_attn_layer_norm",
                                 **kw)
        mlp_norm = OPTLayerNorm(c.layer_norm_elementwise_affine, name="final_layer_norm", **kw)
        a = OPTAttention(c, name="self_attn", **kw)(attn_norm(x) if pre else x, mask, cache,
                                                     prefill)
        if cache is not None:
            a, cache = a
        x = x + a
        if not pre:  # OPT-350m: LayerNorm after the residual sum
            x = attn_norm(x)
        h = mlp_norm(x) if pre else x
        h = Dense(c.ffn_dim, ("embed", "mlp"), c.enable_bias, name="fc1", **kw)(h)
        h = activation(c.activation_function)(h)
        x = x + Dense(c.hidden_size, ("mlp", "embed"), c.enable_bias, name="fc2", **kw)(h)
        if not pre:
            x = mlp_norm(x)
        x = nn.with_logical_constraint(x, ACT_AXES)
        return x if cache is None else (x, cache)


def positions_from_mask(attention_mask):
    """HF OPT's positions of a (left or right) padded batch: the count of real tokens before
    each one; -1 on padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m - 1


class OPTDecoder(nn.Module):
    """HF's `OPTDecoder`: embeddings, positions, layers, final norm and projections."""

    cfg: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "xla"  # model.attention (see LlamaModel)

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(c.vocab_size, c.word_embed_proj_dim, **kw)
        self.embed_positions = Embed(c.max_position_embeddings + POSITION_OFFSET,
                                     c.hidden_size, axes=(None, "embed"), **kw)
        self.projected = c.word_embed_proj_dim != c.hidden_size
        if self.projected:
            self.project_in = Dense(c.hidden_size, (None, "embed"), use_bias=False, **kw)
            self.project_out = Dense(c.word_embed_proj_dim, ("embed", None), use_bias=False,
                                     **kw)
        self.final_norm = c.do_layer_norm_before and not c.remove_final_layer_norm
        if self.final_norm:
            self.final_layer_norm = OPTLayerNorm(c.layer_norm_elementwise_affine, **kw)
        self.stack = LayerStack(
            OPTDecoderLayer, dict(cfg=c, **kw), c.num_hidden_layers, num_args=1,
            scan=self.scan_layers, remat_policy=self.remat_policy)
        nn.share_scope(self, self.stack)

    def __call__(self, inputs_embeds, attention_mask=None, segment_ids=None, position_ids=None,
                 *, cache=None, kv_mask=None, prefill=False):
        b, s, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = (positions_from_mask(attention_mask) if attention_mask is not None
                            else jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s)))
        x = inputs_embeds.astype(self.dtype)
        if self.projected:
            x = self.project_in(x)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)
        x = nn.with_logical_constraint(x, ACT_AXES)
        # Parameters do not depend on the attention implementation: init takes the XLA
        # path, so a model's shapes trace on any host (a TPU model's on a laptop).
        implementation = "xla" if self.is_initializing() else splash.resolve(self.attention)
        if cache is None:
            mask = attention.self_attention_mask(
                implementation, s, attention_mask=attention_mask, segment_ids=segment_ids)
            x, _ = self.stack(x, mask)
            return self._finish(x)
        max_len = kv_mask.shape[1]
        index = cache["index"]
        if prefill and implementation != "xla":
            mask = attention.self_attention_mask(implementation, s, attention_mask=kv_mask[:, :s])
        else:
            mask = attention.make_attention_mask(s, max_len, causal=True, attention_mask=kv_mask,
                                                 q_offset=index - (max_len - s))
        x, cache = self.stack(x, mask, cache=cache, prefill=prefill)
        return self._finish(x), {**cache, "index": index + s}

    def _finish(self, x):
        if self.final_norm:
            x = self.final_layer_norm(x)
        return self.project_out(x) if self.projected else x


class OPTModel(nn.Module):
    """HF's `OPTModel` (one `decoder` inside). `embed(ids)` gives the word embeddings
    (`word_embed_proj_dim` wide, before `project_in`: composed models merge their image
    features into these); `__call__(inputs_embeds, ...)` returns the last hidden states
    after the final norm and `project_out`, as `LlamaModel` does. Positions, when not given,
    come from the attention mask as HF OPT computes them (left padding changes no logit)."""

    cfg: Any  # text config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "xla"  # model.attention (see LlamaModel)

    def setup(self):
        self.decoder = OPTDecoder(self.cfg, self.dtype, self.param_dtype, self.scan_layers,
                                  self.remat_policy, self.attention)

    def embed(self, input_ids):
        return self.decoder.embed_tokens(input_ids)

    def embedding_table(self):
        return self.decoder.embed_tokens.embedding

    def attend(self, h):
        return self.decoder.embed_tokens.attend(h)

    def __call__(self, inputs_embeds, attention_mask=None, segment_ids=None, position_ids=None,
                 *, cache=None, kv_mask=None, prefill=False):
        return self.decoder(inputs_embeds, attention_mask, segment_ids, position_ids,
                            cache=cache, kv_mask=kv_mask, prefill=prefill)


def _cache_shape(c):
    return ml_collections.ConfigDict(dict(
        num_key_value_heads=c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
        head_dim=c.hidden_size // c.num_attention_heads))


def init_cache(c, batch: int, max_len: int, dtype, scan_layers: bool) -> dict:
    """An empty KV cache in LLaMA's layout (see `llama.init_cache`): keys/values [batch,
    heads, max_len, head_dim] per layer, and the shared write index."""
    return llama.init_cache(_cache_shape(c), batch, max_len, dtype, scan_layers)


def text_forward_flops(t, seq: int) -> float:
    """Matmul FLOPs of one sequence of `seq` tokens, projections and output head included."""
    d, w = t.hidden_size, t.word_embed_proj_dim
    per_layer = 2 * seq * d * 4 * d + 2 * seq * 2 * d * t.ffn_dim + 2 * 2 * seq * seq * d
    projections = 2 * 2 * seq * d * w if w != d else 0
    return t.num_hidden_layers * per_layer + projections + 2 * seq * w * t.vocab_size


def text_attention_flops(t, seq: int) -> float:
    """The scores and weighted values within `text_forward_flops` (the full square)."""
    return t.num_hidden_layers * 2 * 2 * seq * seq * t.hidden_size


INT_FIELDS = ("vocab_size", "hidden_size", "ffn_dim", "num_attention_heads",
              "max_position_embeddings", "word_embed_proj_dim")
BOOL_FIELDS = ("do_layer_norm_before", "remove_final_layer_norm", "enable_bias",
               "layer_norm_elementwise_affine", "tie_word_embeddings")


def check_text(t, where: str = "text config") -> None:
    """OPT's constraints on a text config (or a dict of its fields): positive integer sizes,
    a sane layer count, heads dividing the width, a known activation, flags that are
    booleans, token ids that are ids."""
    for name in INT_FIELDS:
        checks.positive_int(t, name, where)
    checks.layer_count(t, "num_hidden_layers", where)
    checks.divides(t, "num_attention_heads", "hidden_size", where)
    checks.one_of(t, "activation_function", where, sorted(ACTIVATIONS))
    for name in BOOL_FIELDS:
        if not isinstance(t[name], bool):
            raise InvalidConfigError(f"{where}: {HF_NAMES.get(name, name)} = {t[name]!r} must "
                                     f"be true or false; the config is damaged or was "
                                     f"edited; restore it")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        checks.token_id(t, name, where)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def text_from_hf(hf: dict, where: str = "config.json"):
    """Our OPT config from an HF `OPTConfig` dict (a config.json, or BLIP-2's
    `text_config`), completed with OPTConfig's defaults."""
    if hf.get("model_type", "opt") != "opt":
        raise UnsupportedModelError(f"{where}: model_type {hf.get('model_type')!r} is not opt")
    fields = {k: hf.get(HF_NAMES.get(k, k), v) for k, v in OPT_DEFAULTS.items()}
    if fields["word_embed_proj_dim"] is None:
        fields["word_embed_proj_dim"] = fields["hidden_size"]
    fields["eos_token_id"] = _first(fields["eos_token_id"])
    check_text(fields, where)  # before anything is built from the values
    return opt_text_config(**fields)


def text_to_hf(t) -> dict:
    hf = {"model_type": "opt", "architectures": ["OPTForCausalLM"]}
    for k in OPT_DEFAULTS:
        hf[HF_NAMES.get(k, k)] = t[k]
    return hf


register_decoder("opt", DecoderSpec(
    module=OPTModel, config=opt_text_config, init_cache=init_cache,
    reorder_cache=llama.reorder_cache, flops=text_forward_flops,
    attention_flops=text_attention_flops, from_hf=text_from_hf,
    to_hf=text_to_hf, check=check_text, learned_positions=True))
