"""The Q-Former connector (`projector.type = "qformer"`): BLIP-2's querying transformer and
InstructBLIP's variant that also reads the instruction tokens.

`QFormerModel` is HF's `Blip2QFormerModel` (`model_type` blip_2_qformer) or
`InstructBlipQFormerModel` (instructblip_qformer): BERT-style post-LayerNorm layers, self-
attention over queries (and instruction tokens), cross-attention from the query positions to
the image features in every `cross_attention_frequency`-th layer (layers 0, f, 2f, ...),
separate feed-forward weights for query positions (`intermediate_query` / `output_query`)
and text positions (`intermediate` / `output`). `QFormerConnector` adds the learnable
`query_tokens` and the `language_projection` into the LLM's width: one output token per
query. Parameter paths are HF's names (`encoder/layer_3/crossattention/attention/key`);
the HF key and config mappings live in `qformer_hf.py`.

The layers differ (cross-attention or not), so they are unrolled, never scanned.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mllm_jax.models import attention
from mllm_jax.models.layers import Dense, Embed, LayerNorm, activation, dtype_of
from mllm_jax.models.registry import ConnectorSpec, register_connector

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")
MODEL_TYPES = ("blip_2_qformer", "instructblip_qformer")


def qformer_config(**overrides) -> ml_collections.ConfigDict:
    """The connector's section (`cfg.projector`). Field names are HF's `Blip2QFormerConfig`
    / `InstructBlipQFormerConfig` ones (defaults: transformers'), plus `num_query_tokens`
    (HF keeps it on the composed config)."""
    c = ml_collections.ConfigDict()
    c.type = "qformer"  # the connector (models.registry.CONNECTORS)
    c.model_type = "blip_2_qformer"  # or instructblip_qformer (reads instruction tokens)
    c.num_query_tokens = 32
    c.vocab_size = 30522
    c.hidden_size = 768
    c.num_hidden_layers = 12
    c.num_attention_heads = 12
    c.intermediate_size = 3072
    c.hidden_act = "gelu"  # exact GELU
    c.hidden_dropout_prob = 0.1
    c.attention_probs_dropout_prob = 0.1
    c.max_position_embeddings = 512
    c.layer_norm_eps = 1e-12
    c.pad_token_id = 0
    c.cross_attention_frequency = 2
    c.encoder_hidden_size = 1408  # width of the image features the queries attend to
    c.initializer_range = 0.02  # std of the initial query tokens, kernels and embeddings
    # BLIP-2 only: text feed-forward weights (`intermediate` / `output`) in every layer, for
    # text positions (image-text retrieval, stage-1 pre-training). InstructBLIP always has them.
    c.use_qformer_text_input = False
    c.update(overrides)
    return c


def _init(q):
    # Kernels, embeddings and the query tokens draw from N(0, initializer_range), as in
    # LAVIS. (transformers' `_init_weights` zeroes the query tokens: every query then starts
    # identical, and only dropout tells them apart.)
    return nn.initializers.normal(q.initializer_range)


def has_text_ffn(q) -> bool:
    return q.model_type == "instructblip_qformer" or bool(q.use_qformer_text_input)


def has_cross_attention(q, layer: int) -> bool:
    return layer % q.cross_attention_frequency == 0


class QFormerMultiHeadAttention(nn.Module):
    """`query`, `key`, `value` (all with biases); keys and values read `kv_states` (the image
    features for cross-attention, whose width is `encoder_hidden_size`)."""

    cfg: Any  # the Q-Former config
    cross: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, kv_states, mask, deterministic: bool):
        c = self.cfg
        b, s, d = x.shape
        nh = c.num_attention_heads
        hd = d // nh
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_init(c))
        kv_axes = ("vision_embed" if self.cross else "embed", "heads")
        q = Dense(d, ("embed", "heads"), name="query", **kw)(x).reshape(b, s, nh, hd)
        k = Dense(d, kv_axes, name="key", **kw)(kv_states)
        v = Dense(d, kv_axes, name="value", **kw)(kv_states)
        k = k.reshape(b, -1, nh, hd)
        v = v.reshape(b, -1, nh, hd)
        rate = c.attention_probs_dropout_prob
        if deterministic or rate == 0:
            out = attention.dot_product_attention(q, k, v, mask, scale=hd ** -0.5)
        else:  # dropout on the attention probabilities, as HF does in training
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            scores = jnp.where(mask, scores * hd ** -0.5, jnp.finfo(jnp.float32).min)
            probs = nn.Dropout(rate)(jax.nn.softmax(scores, axis=-1), deterministic=False)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return out.reshape(b, s, d)


class QFormerResidualOutput(nn.Module):
    """BERT's `*Output`: `LayerNorm(dropout(dense(h)) + residual)` (post-LayerNorm)."""

    cfg: Any
    dtype: Any
    param_dtype: Any
    in_axis: str = "heads"

    @nn.compact
    def __call__(self, h, residual, deterministic: bool):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(c.hidden_size, (self.in_axis, "embed"), name="dense", kernel_init=_init(c),
                  **kw)(h)
        h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return LayerNorm(c.layer_norm_eps, name="LayerNorm", **kw)(h + residual)


class QFormerAttention(nn.Module):
    """`attention` (the heads) then `output` (dense + residual + LayerNorm)."""

    cfg: Any
    cross: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, kv_states, mask, deterministic: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = QFormerMultiHeadAttention(self.cfg, self.cross, name="attention", **kw)(
            x, kv_states, mask, deterministic)
        return QFormerResidualOutput(self.cfg, name="output", **kw)(h, x, deterministic)


class QFormerIntermediate(nn.Module):
    """BERT's `*Intermediate`: `act(dense(x))`."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = Dense(c.intermediate_size, ("embed", "mlp"), name="dense", dtype=self.dtype,
                  param_dtype=self.param_dtype, kernel_init=_init(c))(x)
        return activation(c.hidden_act)(h)


class QFormerLayer(nn.Module):
    cfg: Any
    index: int  # the layer's position: cross-attention every cross_attention_frequency
    dtype: Any
    param_dtype: Any

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention = QFormerAttention(c, cross=False, **kw)
        if has_cross_attention(c, self.index):
            self.crossattention = QFormerAttention(c, cross=True, **kw)
        self.intermediate_query = QFormerIntermediate(c, **kw)
        self.output_query = QFormerResidualOutput(c, in_axis="mlp", **kw)
        if has_text_ffn(c):
            self.intermediate = QFormerIntermediate(c, **kw)
            self.output = QFormerResidualOutput(c, in_axis="mlp", **kw)

    def _feed_forward(self, x, intermediate, output, deterministic):
        return output(intermediate(x), x, deterministic)

    def __call__(self, x, mask, image_features, image_mask, query_length: int,
                 deterministic: bool):
        h = self.attention(x, x, mask, deterministic)
        # At init both paths run, on zero positions if need be: the parameters are a
        # function of the config, not of the inputs init happens to see.
        init = self.is_initializing()
        parts = []
        if query_length > 0 or init:
            queries = h[:, :query_length]
            if has_cross_attention(self.cfg, self.index):
                queries = self.crossattention(queries, image_features, image_mask,
                                              deterministic)
            parts.append(self._feed_forward(queries, self.intermediate_query,
                                            self.output_query, deterministic))
        if h.shape[1] > query_length or (init and has_text_ffn(self.cfg)):
            if not has_text_ffn(self.cfg):
                raise ValueError(
                    f"this Q-Former ({self.cfg.model_type}, use_qformer_text_input=False) has "
                    f"no feed-forward weights for text positions, but the input has "
                    f"{h.shape[1] - query_length} positions after the {query_length} queries; "
                    "pass only the query embeddings, or set use_qformer_text_input=True")
            parts.append(self._feed_forward(h[:, query_length:], self.intermediate,
                                            self.output, deterministic))
        parts = [p for p in parts if p.shape[1]]
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return nn.with_logical_constraint(out, ACT_AXES)


class QFormerEmbeddings(nn.Module):
    """InstructBLIP's `embeddings`: word + absolute position embeddings of the instruction
    tokens, placed after the query embeddings; LayerNorm and dropout over the whole
    sequence."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, query_embeds, input_ids, deterministic: bool):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = query_embeds.astype(self.dtype)
        if input_ids is None and self.is_initializing():  # the embeddings exist regardless
            input_ids = jnp.zeros((x.shape[0], 0), jnp.int32)
        if input_ids is not None:
            t = input_ids.shape[1]
            if t > c.max_position_embeddings:
                raise ValueError(
                    f"qformer_input_ids hold {t} tokens; the Q-Former has "
                    f"max_position_embeddings={c.max_position_embeddings}: truncate the "
                    "instruction to that many tokens")
            std = c.initializer_range
            words = Embed(c.vocab_size, c.hidden_size, name="word_embeddings", init_std=std,
                          **kw)(input_ids)
            pos = Embed(c.max_position_embeddings, c.hidden_size, axes=(None, "embed"),
                        name="position_embeddings", init_std=std, **kw).embedding[:t]
            x = jnp.concatenate([x, words + pos.astype(self.dtype)[None]], axis=1)
        x = LayerNorm(c.layer_norm_eps, name="layernorm", **kw)(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class QFormerEncoder(nn.Module):
    """`layer_{i}` for i < num_hidden_layers, unrolled."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, image_features, image_mask, query_length, deterministic):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.cfg.num_hidden_layers):
            x = QFormerLayer(self.cfg, i, name=f"layer_{i}", **kw)(
                x, mask, image_features, image_mask, query_length, deterministic)
        return x


class QFormerModel(nn.Module):
    """HF's `Blip2QFormerModel` / `InstructBlipQFormerModel` (by `cfg.model_type`).

    query_embeds [n, q, d]: the query tokens (for BLIP-2 with text input, the text
      embeddings may follow them: pass `query_length`; 0 for text alone).
    image_features [n, tokens, encoder_hidden_size] (None with query_length=0); image_mask
      [n, tokens] (1 = attend), default all ones.
    input_ids [n, t] (InstructBLIP only): the instruction tokens after the queries.
    attention_mask [n, q + t] over the whole sequence (HF's convention), default all ones;
      or [n, q + t, q + t], a self-attention mask per position (1 = position i attends to
      position j), as BLIP-2's image-grounded text generation needs (queries see queries
      only, text sees the queries and the text before it).
    Returns `last_hidden_state` [n, q + t, d].
    """

    cfg: Any  # the Q-Former config (`qformer_config`)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query_embeds, image_features, *, input_ids=None, attention_mask=None,
                 image_mask=None, query_length=None, deterministic: bool = True):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.model_type not in MODEL_TYPES:
            raise ValueError(f"Q-Former model_type {c.model_type!r} is not one of "
                             f"{', '.join(MODEL_TYPES)}")
        if query_length is None:
            query_length = query_embeds.shape[1]
        if image_features is None:
            if query_length:
                raise ValueError("the queries cross-attend to image features: pass "
                                 "image_features, or query_length=0 for text only")
            # Text only (BLIP-2's text encoder): no cross-attention runs; a stand-in keeps
            # the parameters created at init.
            image_features = jnp.zeros((1, 1, c.encoder_hidden_size), self.dtype)
        if image_features.shape[-1] != c.encoder_hidden_size:
            raise ValueError(
                f"image features have width {image_features.shape[-1]}, the Q-Former's "
                f"encoder_hidden_size is {c.encoder_hidden_size}: set it to the encoder's "
                "feature size")
        if c.model_type == "instructblip_qformer":
            x = QFormerEmbeddings(c, name="embeddings", **kw)(query_embeds, input_ids,
                                                              deterministic)
        else:
            if input_ids is not None:
                raise ValueError("a blip_2_qformer takes no input_ids: BLIP-2 embeds text "
                                 "outside the Q-Former; concatenate the text embeddings after "
                                 "the queries in query_embeds and pass query_length")
            x = LayerNorm(c.layer_norm_eps, name="layernorm", **kw)(
                query_embeds.astype(self.dtype))
            x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ACT_AXES)
        mask, image_mask = _key_mask(attention_mask), _key_mask(image_mask)
        image_features = image_features.astype(self.dtype)
        return QFormerEncoder(c, name="encoder", **kw)(x, mask, image_features, image_mask,
                                                     query_length, deterministic)


def _key_mask(mask):
    """[n, kv] (1 = attend) -> [n, 1, 1, kv] bool; [n, q, kv] -> [n, 1, q, kv]; None ->
    every key."""
    if mask is None:
        return jnp.ones((1, 1, 1, 1), bool)
    if mask.ndim == 3:
        return mask.astype(bool)[:, None]
    return mask.astype(bool)[:, None, None, :]


class QFormerConnector(nn.Module):
    """Image features [n, tokens, d_enc] -> [n, num_query_tokens, text.hidden_size]: the
    learnable `query_tokens` [1, q, d] read the features through `qformer`, and the query
    positions' outputs go through `language_projection`. With `qformer_input_ids` [n, t]
    (and `qformer_attention_mask` [n, t]: HF's InstructBLIP inputs) an instructblip_qformer
    also reads the instruction; the queries always attend to every image feature."""

    cfg: Any  # composed model config: `projector` (a `qformer_config`), `text.hidden_size`

    @nn.compact
    def __call__(self, image_features, qformer_input_ids=None, qformer_attention_mask=None,
                 deterministic: bool = True):
        c = self.cfg
        q = c.projector
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        n = image_features.shape[0]
        tokens = self.param("query_tokens", nn.with_logical_partitioning(
            _init(q), (None, None, "embed")),
            (1, q.num_query_tokens, q.hidden_size), kw["param_dtype"])
        queries = jnp.broadcast_to(tokens, (n,) + tokens.shape[1:])
        mask = None
        if qformer_input_ids is not None:
            text_mask = (jnp.ones(qformer_input_ids.shape, jnp.int32)
                         if qformer_attention_mask is None else qformer_attention_mask)
            mask = jnp.concatenate([jnp.ones((n, q.num_query_tokens), text_mask.dtype),
                                    text_mask], axis=1)
        elif qformer_attention_mask is not None:
            raise ValueError("qformer_attention_mask was given without qformer_input_ids")
        out = QFormerModel(q, name="qformer", **kw)(
            queries, image_features, input_ids=qformer_input_ids, attention_mask=mask,
            deterministic=deterministic)
        # As the projection connectors: the input side is the connector's feature width.
        return Dense(c.text.hidden_size, ("vision_embed", "embed"), name="language_projection",
                     kernel_init=_init(q), **kw)(out[:, :q.num_query_tokens])


def forward_flops(cfg, tokens_in: int, d_in: int) -> float:
    """Matmul FLOPs of one image: the queries through every layer (instruction tokens not
    counted), cross-attention to `tokens_in` features of width `d_in`, the projection."""
    q = cfg.projector
    n, d, f = q.num_query_tokens, q.hidden_size, q.intermediate_size
    cross = math.ceil(q.num_hidden_layers / q.cross_attention_frequency)
    self_attn = 2 * n * 4 * d * d + 2 * 2 * n * n * d
    cross_attn = 2 * n * 2 * d * d + 2 * tokens_in * 2 * d_in * d + 2 * 2 * n * tokens_in * d
    ffn = 2 * n * 2 * d * f
    projection = 2 * n * d * cfg.text.hidden_size
    return q.num_hidden_layers * (self_attn + ffn) + cross * cross_attn + projection


def _sample_input_keys(cfg) -> tuple:
    """An instructblip_qformer reads each sample's instruction (`qformer_input_ids`,
    `qformer_attention_mask`)."""
    if cfg.projector.model_type != "instructblip_qformer":
        return ()
    from mllm_jax.models.blip2_prompts import InstructionInputs
    return InstructionInputs.keys


def _sample_inputs(cfg, data_cfg):
    """The instruction builder of a LLaVA-style model with an instructblip_qformer
    connector: the Q-Former's tokenizer is data.qformer_tokenizer, data.tokenizer/
    qformer_tokenizer, or else the LLM's own (data.tokenizer), whose ids the Q-Former's
    `vocab_size` must then cover."""
    from mllm_jax.models.blip2_prompts import instruction_inputs
    return instruction_inputs(cfg, data_cfg, llm_tokenizer_fallback=True)


register_connector("qformer", ConnectorSpec(
    module=QFormerConnector, config=qformer_config,
    tokens_out=lambda cfg, tokens_in: cfg.projector.num_query_tokens, flops=forward_flops,
    sample_inputs=_sample_inputs, sample_input_keys=_sample_input_keys))
