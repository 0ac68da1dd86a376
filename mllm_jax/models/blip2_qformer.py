"""BLIP-2's stage-1 model (`model_type` blip2_qformer): a vision tower, learnable query
tokens and a Q-Former with text feed-forward weights, trained from scratch on image-caption
pairs with three objectives (`train.blip2_stage1`): image-text contrastive (ITC),
image-text matching (ITM) and image-grounded text generation (ITG).

Parameter paths follow transformers' `Blip2ForImageTextRetrieval` where it has the part:
`vision_model` (the registered encoder `cfg.vision.type`, normally frozen), `query_tokens`
[1, q, d], `embeddings` (word + position embeddings of the caption; the Q-Former's own
`layernorm` normalises [queries | text] together, as BERT's embedding LayerNorm does in
LAVIS), `qformer` (`QFormerModel`, with `use_qformer_text_input`), `vision_projection`,
`text_projection`, `itm_head`; plus LAVIS's `temp` (the learnable temperature, 0.07 at
init), `ln_vision` (LAVIS's trainable LayerNorm over the frozen tower's features; HF folds
it into the vision model's `post_layernorm`) when `cfg.ln_vision`, and the ITG language-model
head under BERT's names, `cls/predictions/transform/{dense,LayerNorm}` and
`cls/predictions/bias`, its decoder tied to `embeddings/word_embeddings`.

The attention masks of the three objectives (`itm_attention_mask`, `itg_attention_mask`):
ITC runs the queries alone (with the image) and the text alone, so neither sees the other;
ITM runs [queries | text] fully bidirectionally; ITG lets the queries see the queries only
and the text see every query and the text before it (LAVIS's UniLM-style mask).

The trained `query_tokens` and `qformer` are what a stage-2 model starts from:
`copy_qformer` puts them into a LLaVA-style model with `projector.type = "qformer"` or a
BLIP-2 model (`query_tokens`, `qformer/...`).
"""
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models.connectors.qformer import QFormerModel, qformer_config
from mllm_jax.models.connectors.qformer_hf import check_qformer
from mllm_jax.models.layers import Dense, Embed, LayerNorm, activation, dtype_of, with_axes
from mllm_jax.models.registry import ENCODERS, ModelFamily, register_model


def blip2_qformer_config(vision=None, qformer=None, **overrides) -> ml_collections.ConfigDict:
    """Defaults: BLIP-2's ViT-L variant (CLIP ViT-L/14 at 224 px without its last layer,
    every token including CLS, LAVIS's `ln_vision`), 32 queries, a BERT-base Q-Former whose
    vocabulary has LAVIS's added decoder token [DEC] (id 30522), 256-d ITC space."""
    c = ml_collections.ConfigDict()
    c.model_type = "blip2_qformer"
    c.vision = vision if vision is not None else mc.vision_config(image_size=224)
    c.vision_feature_layer = ml_collections.FieldReference(-2, field_type=object)
    c.vision_feature_select_strategy = "full"  # BLIP-2 keeps the CLS token
    c.ln_vision = True  # a trainable LayerNorm over the tower's features (LAVIS)
    c.ln_vision_eps = 1e-5
    c.qformer = qformer if qformer is not None else qformer_config(
        use_qformer_text_input=True, vocab_size=30523, encoder_hidden_size=1024)
    c.image_text_hidden_size = 256  # the ITC space (LAVIS embed_dim)
    c.dec_token_id = 30522  # replaces the text's first token ([CLS]) in ITG
    c.temp_init = 0.07
    mc.runtime_fields(c)
    c.update(overrides)
    return c


def itm_attention_mask(num_queries: int, text_mask):
    """ITM's key mask [n, q + t] over [queries | text]: every position sees every query and
    every real text token (bidirectional); padding keys are masked."""
    n = text_mask.shape[0]
    return jnp.concatenate([jnp.ones((n, num_queries), bool), text_mask.astype(bool)], axis=1)


def itg_attention_mask(num_queries: int, text_mask):
    """ITG's self-attention mask [n, q + t, q + t] over [queries | text] (1 = row attends to
    column): query rows see the queries only; text row i sees every query and the real text
    tokens j <= i."""
    n, t = text_mask.shape
    q = num_queries
    causal = jnp.tril(jnp.ones((t, t), bool))[None] & text_mask.astype(bool)[:, None, :]
    query_rows = jnp.concatenate([jnp.ones((n, q, q), bool), jnp.zeros((n, q, t), bool)], 2)
    text_rows = jnp.concatenate([jnp.ones((n, t, q), bool), causal], axis=2)
    return jnp.concatenate([query_rows, text_rows], axis=1)


class TextEmbeddings(nn.Module):
    """HF's `Blip2TextEmbeddings`: word + absolute position embeddings (no LayerNorm: the
    Q-Former's input LayerNorm follows)."""

    cfg: Any  # the Q-Former config
    dtype: Any
    param_dtype: Any

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        std = c.initializer_range
        self.word_embeddings = Embed(c.vocab_size, c.hidden_size, init_std=std, **kw)
        self.position_embeddings = Embed(c.max_position_embeddings, c.hidden_size,
                                         axes=(None, "embed"), init_std=std, **kw)

    def __call__(self, input_ids):
        c = self.cfg
        t = input_ids.shape[1]
        if t > c.max_position_embeddings:
            raise ValueError(f"captions of {t} tokens; the Q-Former has max_position_embeddings"
                             f"={c.max_position_embeddings}: truncate them (data.max_length)")
        pos = self.position_embeddings.embedding[:t].astype(self.dtype)
        return self.word_embeddings(input_ids) + pos[None]

    def word_matrix(self):
        """The word embeddings [vocab, d] (the LM head's tied decoder)."""
        return self.word_embeddings.embedding


class PredictionTransform(nn.Module):
    """BERT's `cls.predictions.transform`: LayerNorm(act(dense(h)))."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(c.hidden_size, ("embed", "mlp"), name="dense",
                  kernel_init=nn.initializers.normal(c.initializer_range), **kw)(h)
        return LayerNorm(c.layer_norm_eps, axis_name="mlp", name="LayerNorm",
                         **kw)(activation(c.hidden_act)(h))


class Predictions(nn.Module):
    """BERT's `cls.predictions`: the transform, then logits against the (tied) word
    embeddings plus `bias` [vocab]."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h, word_embeddings):
        c = self.cfg
        h = PredictionTransform(c, self.dtype, self.param_dtype, name="transform")(h)
        bias = self.param("bias", with_axes(nn.initializers.zeros, ("vocab",)),
                          (c.vocab_size,), self.param_dtype)
        logits = jnp.einsum("...d,vd->...v", h.astype(self.dtype),
                            word_embeddings.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return logits + bias.astype(jnp.float32)


class LMHead(nn.Module):
    """BERT's `cls` (BertOnlyMLMHead)."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h, word_embeddings):
        return Predictions(self.cfg, self.dtype, self.param_dtype, name="predictions")(
            h, word_embeddings)


class Blip2QFormerPretraining(nn.Module):
    """The stage-1 model. Methods: `image_embeds` (tower features, after `ln_vision`),
    `query_features` (queries through the Q-Former with the image), `text_features` (the
    caption alone, [CLS] output), `itc_features` (normalised ITC vectors), `itm_logits`,
    `itg_logits`; `__call__` runs each once (what `init` uses)."""

    cfg: Any

    def setup(self):
        c = self.cfg
        q = c.qformer
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        init = nn.initializers.normal(q.initializer_range)
        self.vision_model = ENCODERS.get(c.vision.type).module(c)
        if c.ln_vision:
            self.ln_vision = LayerNorm(c.ln_vision_eps, axis_name="vision_embed", **kw)
        self.query_tokens = self.param(
            "query_tokens", with_axes(init, (None, None, "embed")),
            (1, q.num_query_tokens, q.hidden_size), kw["param_dtype"])
        self.embeddings = TextEmbeddings(q, **kw)
        self.qformer = QFormerModel(q, **kw)
        e = c.image_text_hidden_size
        self.vision_projection = Dense(e, ("embed", None), kernel_init=init, **kw)
        self.text_projection = Dense(e, ("embed", None), kernel_init=init, **kw)
        self.itm_head = Dense(2, ("embed", None), kernel_init=init, **kw)
        self.temp = self.param("temp", with_axes(nn.initializers.constant(c.temp_init), ()),
                               (), jnp.float32)
        self.cls = LMHead(q, **kw)

    @property
    def num_queries(self) -> int:
        return self.cfg.qformer.num_query_tokens

    def image_embeds(self, pixel_values):
        """NHWC pixels [n, h, w, c] -> the features the queries read [n, tokens, d_enc]."""
        feats = self.vision_model(pixel_values)
        return self.ln_vision(feats) if self.cfg.ln_vision else feats

    def _queries(self, n):
        return jnp.broadcast_to(self.query_tokens, (n,) + self.query_tokens.shape[1:])

    def query_features(self, image_embeds, deterministic: bool = True):
        """The queries' outputs [n, q, d] (queries see queries and, by cross-attention, the
        image)."""
        return self.qformer(self._queries(image_embeds.shape[0]), image_embeds,
                            deterministic=deterministic)

    def text_features(self, input_ids, attention_mask, deterministic: bool = True):
        """The caption through the Q-Former alone (no queries): outputs [n, t, d]."""
        return self.qformer(self.embeddings(input_ids), None, attention_mask=attention_mask,
                            query_length=0, deterministic=deterministic)

    def itc_features(self, image_embeds, input_ids, attention_mask, deterministic=True):
        """(image_feats [n, q, e], text_feat [n, e]), L2-normalised: every query's projection
        and the projection of the caption's first ([CLS]) output."""
        img = self.vision_projection(self.query_features(image_embeds, deterministic))
        txt = self.text_projection(
            self.text_features(input_ids, attention_mask, deterministic)[:, 0])
        return _normalize(img), _normalize(txt)

    def encode_image(self, pixel_values):
        """Pixels -> the normalised ITC vectors of the queries [n, q, e] (retrieval)."""
        feats = self.query_features(self.image_embeds(pixel_values))
        return _normalize(self.vision_projection(feats))

    def encode_text(self, input_ids, attention_mask):
        """Captions -> their normalised ITC vectors [n, e] (retrieval)."""
        return _normalize(self.text_projection(
            self.text_features(input_ids, attention_mask)[:, 0]))

    def itm_logits(self, image_embeds, input_ids, attention_mask, deterministic=True):
        """[n, 2] (not matched, matched): `itm_head` on each query output of the
        bidirectional [queries | text] pass, averaged over the queries."""
        x = jnp.concatenate([self._queries(input_ids.shape[0]).astype(self.qformer.dtype),
                             self.embeddings(input_ids)], axis=1)
        out = self.qformer(x, image_embeds,
                           attention_mask=itm_attention_mask(self.num_queries, attention_mask),
                           query_length=self.num_queries, deterministic=deterministic)
        return jnp.mean(self.itm_head(out[:, :self.num_queries]).astype(jnp.float32), axis=1)

    def itg_hidden(self, image_embeds, input_ids, attention_mask, deterministic=True):
        """The text positions' outputs [n, t, d] of the ITG pass: the caption with its first
        token replaced by `dec_token_id`, after the queries, under `itg_attention_mask`.
        The query positions are computed again in this pass; with that mask they equal
        `query_features` (LAVIS reuses the image pass's keys and values instead)."""
        ids = jnp.asarray(input_ids).at[:, 0].set(self.cfg.dec_token_id)
        x = jnp.concatenate([self._queries(ids.shape[0]).astype(self.qformer.dtype),
                             self.embeddings(ids)], axis=1)
        out = self.qformer(x, image_embeds,
                           attention_mask=itg_attention_mask(self.num_queries, attention_mask),
                           query_length=self.num_queries, deterministic=deterministic)
        return out[:, self.num_queries:]

    def itg_logits(self, image_embeds, input_ids, attention_mask, deterministic=True):
        """[n, t, vocab] float32: position i predicts token i + 1 of the caption."""
        h = self.itg_hidden(image_embeds, input_ids, attention_mask, deterministic)
        return self.lm_logits(h)

    def lm_logits(self, h):
        return self.cls(h, self.embeddings.word_matrix())

    def temperature(self):
        return self.temp

    def __call__(self, pixel_values, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        emb = self.image_embeds(pixel_values)
        img, txt = self.itc_features(emb, input_ids, attention_mask)
        itm = self.itm_logits(emb, input_ids, attention_mask)
        lm = self.itg_logits(emb, input_ids, attention_mask)
        return img, txt, itm, lm, self.temp


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---- the stage-2 hand-over -------------------------------------------------------------------

def _flat(tree):
    return flax.traverse_util.flatten_dict(tree, sep="/")


# An instructblip_qformer keeps the instruction's embeddings and their LayerNorm inside the
# Q-Former; a stage-1 model has them beside it (`embeddings/`), normalised by the
# Q-Former's `layernorm`, which LAVIS's InstructBLIP shares as its BERT embeddings.
_INSTRUCTION_EMBEDDINGS = (("qformer/embeddings/layernorm/", "qformer/layernorm/"),
                           ("qformer/embeddings/word_embeddings/", "embeddings/word_embeddings/"),
                           ("qformer/embeddings/position_embeddings/",
                            "embeddings/position_embeddings/"))


def _stage1_key(rel: str) -> str:
    for dst, src in _INSTRUCTION_EMBEDDINGS:
        if rel.startswith(dst):
            return src + rel[len(dst):]
    return rel


def copy_qformer(stage1_params, params, *, prefix=None, ln_vision_to=None):
    """`params` (a stage-2 model's tree) with its query tokens and Q-Former taken from a
    stage-1 tree (`stage1_params` of a blip2_qformer model). The stage-2 Q-Former lives
    under `prefix`: found by itself for a LLaVA-style model with `projector.type = "qformer"`
    (`multi_modal_projector/`) and a BLIP-2 model (top level). Every `query_tokens` and
    `qformer/...` array of the destination must exist in the stage-1 tree with its shape;
    stage-1 arrays the destination has no place for (the text feed-forward weights, which a
    stage-2 Q-Former without text input drops, as LAVIS does) are left out. A stage-1
    `ln_vision` changes the features the queries read: it is copied to `ln_vision_to` (a
    path of the destination, e.g. its vision model's post LayerNorm), and refused when that
    is not given. An InstructBLIP Q-Former (`instructblip_qformer`) takes its instruction
    embeddings from the stage-1 text `embeddings` and their LayerNorm from the stage-1
    Q-Former's `layernorm`, as LAVIS initialises InstructBLIP from BLIP-2. Returns a new tree;
    the arrays are the stage-1 ones (not copies)."""
    src, dst = _flat(stage1_params), _flat(params)
    if prefix is None:
        prefix = next((p for p in ("multi_modal_projector/", "") if p + "query_tokens" in dst),
                      None)
        if prefix is None:
            raise ValueError("the destination tree has no query_tokens at the top level or "
                             "under multi_modal_projector/: pass prefix= (the path the "
                             "stage-2 model keeps its query_tokens and qformer under)")
    if "query_tokens" not in src or not any(k.startswith("qformer/") for k in src):
        raise ValueError("stage1_params has no query_tokens / qformer: it is not a "
                         "blip2_qformer parameter tree")
    out, missing = dict(dst), []
    targets = [k for k in dst if k.startswith(prefix) and (
        k[len(prefix):] == "query_tokens" or k[len(prefix):].startswith("qformer/"))]
    for k in targets:
        rel = _stage1_key(k[len(prefix):])
        if rel not in src:
            missing.append(rel)
        elif tuple(np.shape(src[rel])) != tuple(np.shape(dst[k])):
            raise ValueError(f"{k}: the stage-2 model has shape {tuple(np.shape(dst[k]))}, "
                             f"the stage-1 Q-Former {tuple(np.shape(src[rel]))}: give both "
                             "the same Q-Former config (hidden_size, intermediate_size, "
                             "num_query_tokens, encoder_hidden_size, ...)")
        else:
            out[k] = jnp.asarray(src[rel]).astype(jnp.asarray(dst[k]).dtype)
    if missing:
        raise ValueError(f"the stage-1 tree lacks {len(missing)} Q-Former arrays the stage-2 "
                         f"model has, e.g. {missing[:3]}: the Q-Former configs differ "
                         "(num_hidden_layers, cross_attention_frequency, ...)")
    ln = {k: v for k, v in src.items() if k.startswith("ln_vision/")}
    if ln:
        if ln_vision_to is None:
            raise ValueError("the stage-1 model has an ln_vision LayerNorm over the image "
                             "features that the stage-2 model would not apply: pass "
                             "ln_vision_to= (the destination's LayerNorm over the tower's "
                             "features), or train stage 1 with ln_vision=False")
        for k, v in ln.items():
            dest = ln_vision_to.rstrip("/") + "/" + k.split("/", 1)[1]
            if dest not in dst or np.shape(dst[dest]) != np.shape(v):
                raise ValueError(f"ln_vision_to: {dest} is not an array of the destination "
                                 f"with shape {np.shape(v)}")
            out[dest] = jnp.asarray(v).astype(jnp.asarray(dst[dest]).dtype)
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


# ---- checks, FLOPs, registration -------------------------------------------------------------

def check(cfg, where: str = "model config") -> None:
    encoder = ENCODERS.get(cfg.vision.type)
    if encoder.check is not None:
        encoder.check(cfg.vision, f"{where} vision")
    q = cfg.qformer
    check_qformer(q, f"{where} qformer")
    if q.model_type != "blip_2_qformer" or not q.use_qformer_text_input:
        raise checks.InvalidConfigError(
            f"{where}: qformer must be a blip_2_qformer with use_qformer_text_input=True (the "
            f"text passes need the text feed-forward weights), got model_type "
            f"{q.model_type!r}, use_qformer_text_input={q.use_qformer_text_input!r}")
    checks.positive_int(q, "num_query_tokens", f"{where} qformer")
    checks.positive_int(cfg, "image_text_hidden_size", where)
    checks.token_id(cfg, "dec_token_id", where, optional=False)
    if cfg.dec_token_id >= q.vocab_size:
        raise checks.InvalidConfigError(
            f"{where}: dec_token_id = {cfg.dec_token_id} is not below qformer.vocab_size = "
            f"{q.vocab_size}; give the Q-Former a vocabulary that holds the decoder token "
            "(BLIP-2: the tokenizer's size + 1)")
    if encoder.feature_size is not None and encoder.feature_size(cfg) != \
            q.encoder_hidden_size:
        raise checks.InvalidConfigError(
            f"{where}: qformer.encoder_hidden_size = {q.encoder_hidden_size} but the "
            f"{cfg.vision.type} encoder gives features of width {encoder.feature_size(cfg)}; "
            "set them equal")


def _qformer_pass(q, positions, queries, image_tokens, d_enc):
    """Matmul FLOPs of one Q-Former pass over `positions` (of which `queries` cross-attend
    to `image_tokens` features)."""
    import math
    d, f, n = q.hidden_size, q.intermediate_size, positions
    per_layer = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * f
    cross = 0
    if queries:
        cross = (2 * queries * 2 * d * d + 2 * image_tokens * 2 * d_enc * d
                 + 2 * 2 * queries * image_tokens * d)
    return (q.num_hidden_layers * per_layer
            + math.ceil(q.num_hidden_layers / q.cross_attention_frequency) * cross)


def train_flops(cfg, batch, seq, images_per_sample, trainable) -> float:
    """Per step: the tower (forward; 3x when trained), and the Q-Former passes of the three
    objectives, each forward + backward (3x): queries alone, text alone, ITM on 3 pairs per
    sample, ITG with the LM head. `seq`: caption tokens."""
    q, e = cfg.qformer, cfg.image_text_hidden_size
    encoder = ENCODERS.get(cfg.vision.type)
    tokens = encoder.tokens_per_image(cfg, None)
    d_enc = q.encoder_hidden_size
    nq, d, t = q.num_query_tokens, q.hidden_size, max(int(seq), 1)
    vis = encoder.flops(cfg) if encoder.flops else 0.0
    vis *= 3 if "vision_model" in trainable else 1
    per = (_qformer_pass(q, nq, nq, tokens, d_enc) + _qformer_pass(q, t, 0, 0, d_enc)
           + 3 * _qformer_pass(q, nq + t, nq, tokens, d_enc)
           + _qformer_pass(q, nq + t, nq, tokens, d_enc)
           + 2 * t * d * d + 2 * t * d * q.vocab_size + 2 * (nq + 1) * d * e + 2 * 3 * nq * d * 2)
    return batch * (vis + 3 * per)


def init_inputs(cfg):
    v = cfg.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
            jnp.zeros((1, 2), jnp.int32))


register_model("blip2_qformer", ModelFamily(
    module=Blip2QFormerPretraining, config=blip2_qformer_config, init_inputs=init_inputs,
    # Images enter through the queries, not as tokens of the caption.
    tokens_per_image=lambda cfg, image_size=None: 0,
    image_token_id=lambda cfg: None, generates=False, train_flops=train_flops,
    check=check))

