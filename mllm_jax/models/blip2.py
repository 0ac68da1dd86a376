"""The composed BLIP-2 (`model_type` blip2, HF `Blip2ForConditionalGeneration`) and
InstructBLIP (`model_type` instructblip, HF `InstructBlipForConditionalGeneration`) models.

The image goes through the vision tower (`ENCODERS[cfg.vision.type]`, BLIP-2's EVA ViT-g:
its last hidden state, post LayerNorm applied); the learnable `query_tokens` read it through
the Q-Former (`QFormerModel`: InstructBLIP's also reads the instruction, `qformer_input_ids`);
`language_projection` maps the query outputs into the LLM's width, and they replace the
embeddings of the `num_query_tokens` image tokens that HF's processor puts before the text.
The LLM is `registry.language_model(cfg)`: a `CausalLM` (OPT, LLaMA/Vicuna: logits of the
merged sequence) or an encoder-decoder LM (Flan-T5: the encoder reads the merged sequence,
the decoder `decoder_input_ids`).

Parameter paths are HF's on-disk names: `vision_model/...`, `query_tokens`, `qformer/...`,
`language_projection`, `language_model/...`. BLIP-2's HF class keeps the Q-Former and the
query tokens in float32 (`_keep_in_fp32_modules`); here the BLIP-2 Q-Former computes in
float32 whatever the model's dtype, its parameters are stored in the model's parameter
dtype like every other. The HF config and key mappings live in `blip2_hf.py`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mllm_jax import config as mc
from mllm_jax.models import registry
from mllm_jax.models.connectors.qformer import QFormerModel, qformer_config
from mllm_jax.models.layers import Dense, dtype_of
from mllm_jax.models.llava import check_image_tokens, merge_image_features
from mllm_jax.models.registry import CONNECTORS, DECODERS, ENCODERS, decoder_train_flops

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")
# Our model_type -> the HF Q-Former kind it composes.
QFORMER_TYPES = {"blip2": "blip_2_qformer", "instructblip": "instructblip_qformer"}


def blip2_config(model_type: str = "blip2", vision=None, text=None, projector=None,
                 **overrides) -> ml_collections.ConfigDict:
    """A BLIP-2 / InstructBLIP config. `projector` is the Q-Former's section
    (`qformer_config`, with `num_query_tokens`); `vision` the encoder's (default: the
    registered `eva` encoder's defaults, EVA ViT-g/14); `text` the LLM's. Defaults are
    HF's: 32 queries, a BERT-base Q-Former."""
    if model_type not in QFORMER_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {sorted(QFORMER_TYPES)}")
    c = ml_collections.ConfigDict()
    c.model_type = model_type
    c.vision = vision if vision is not None else _default_vision()
    c.projector = projector if projector is not None else qformer_config(
        model_type=QFORMER_TYPES[model_type], encoder_hidden_size=c.vision.hidden_size)
    c.text = text if text is not None else mc.text_config()
    # The id of the image tokens in input_ids (HF `image_token_index` / `image_token_id`).
    c.image_token_index = 32000
    if model_type == "blip2":
        c.image_text_hidden_size = 256  # HF field of the retrieval heads; kept for round trips
    mc.runtime_fields(c)
    c.update(overrides)
    return c


def _default_vision():
    return ENCODERS.get("eva").config() if "eva" in ENCODERS else mc.vision_config()


def is_encoder_decoder(cfg) -> bool:
    """Whether the LLM is an encoder-decoder (a decoder family with its own language-model
    module, see `DecoderSpec.language_model`), as HF's `use_decoder_only_language_model`
    tells it apart."""
    return DECODERS.get(cfg.text.model_type).language_model is not None


class Blip2(nn.Module):
    """BLIP-2 or InstructBLIP (by `cfg.model_type`); see the module docstring."""

    cfg: Any

    def setup(self):
        c = self.cfg
        q = c.projector
        if q.model_type != QFORMER_TYPES[c.model_type]:
            raise ValueError(f"a {c.model_type} model composes a {QFORMER_TYPES[c.model_type]} "
                             f"Q-Former, but projector.model_type is {q.model_type!r}")
        dtype, param_dtype = dtype_of(c.dtype), dtype_of(c.param_dtype)
        init = nn.initializers.normal(q.initializer_range)
        self.vision_model = ENCODERS.get(c.vision.type).module(c)
        self.query_tokens = self.param(
            "query_tokens", nn.with_logical_partitioning(init, (None, None, "embed")),
            (1, q.num_query_tokens, q.hidden_size), param_dtype)
        # BLIP-2's HF class keeps the Q-Former in float32 (`_keep_in_fp32_modules`).
        qformer_dtype = jnp.float32 if c.model_type == "blip2" else dtype
        self.qformer = QFormerModel(q, dtype=qformer_dtype, param_dtype=param_dtype)
        self.language_projection = Dense(c.text.hidden_size, ("vision_embed", "embed"),
                                         dtype=dtype, param_dtype=param_dtype,
                                         kernel_init=init)
        self.language_model = registry.language_model(c)

    def vision_features(self, pixel_values):
        """The vision tower's last hidden state [n_images, tokens, d_vis]."""
        return self.vision_model(pixel_values)

    def project(self, vision_features, qformer_input_ids=None, qformer_attention_mask=None):
        """Vision features [n, tokens, d_vis] -> [n, num_query_tokens, text hidden]: the
        query tokens through the Q-Former (InstructBLIP: with the instruction tokens of each
        image, `qformer_input_ids` [n, t], `qformer_attention_mask` [n, t]), the query
        positions through `language_projection`."""
        c, q = self.cfg, self.cfg.projector
        n = vision_features.shape[0]
        queries = jnp.broadcast_to(self.query_tokens, (n,) + self.query_tokens.shape[1:])
        mask = None
        if qformer_input_ids is not None or qformer_attention_mask is not None:
            if c.model_type != "instructblip":
                raise ValueError("BLIP-2's Q-Former reads no instruction: qformer_input_ids "
                                 "and qformer_attention_mask are InstructBLIP inputs")
            if qformer_input_ids is None:
                raise ValueError("qformer_attention_mask was given without qformer_input_ids")
            if qformer_input_ids.shape[0] != n:
                raise ValueError(
                    f"qformer_input_ids hold {qformer_input_ids.shape[0]} instructions for "
                    f"{n} images; give one (padded) instruction per image")
            text_mask = (jnp.ones(qformer_input_ids.shape, jnp.int32)
                         if qformer_attention_mask is None
                         else jnp.asarray(qformer_attention_mask, jnp.int32))
            mask = jnp.concatenate([jnp.ones((n, q.num_query_tokens), jnp.int32), text_mask],
                                   axis=1)
        elif c.model_type == "instructblip" and self.is_initializing():
            qformer_input_ids = jnp.zeros((n, 1), jnp.int32)  # creates the text embeddings
        out = self.qformer(queries, vision_features, input_ids=qformer_input_ids,
                           attention_mask=mask)
        out = out[:, :q.num_query_tokens].astype(dtype_of(c.dtype))
        return self.language_projection(out)

    def image_features(self, pixel_values, qformer_input_ids=None,
                       qformer_attention_mask=None):
        """[n_images, h, w, c] -> [n_images, num_query_tokens, text hidden];
        [b, max_images, h, w, c] -> [b, max_images, num_query_tokens, text hidden] (with
        `qformer_input_ids` [b, t]: one image per sample)."""
        if pixel_values.ndim == 5:
            b, m = pixel_values.shape[:2]
            if qformer_input_ids is not None:  # training batches: one instruction per sample
                if m != 1 or qformer_input_ids.shape[0] != b:
                    raise ValueError(
                        f"qformer_input_ids {tuple(qformer_input_ids.shape)} for images "
                        f"{tuple(pixel_values.shape[:2])} (batch, images per sample): "
                        "InstructBLIP reads one instruction per image; give one image per "
                        "sample (data.images=1)")
            feats = self.image_features(pixel_values.reshape(b * m, *pixel_values.shape[2:]),
                                        qformer_input_ids, qformer_attention_mask)
            return feats.reshape(b, m, *feats.shape[1:])
        return self.project(self.vision_features(pixel_values), qformer_input_ids,
                            qformer_attention_mask)

    def embed(self, input_ids, pixel_values=None, *, image_features=None,
              qformer_input_ids=None, qformer_attention_mask=None):
        """Text embeddings with the projected query outputs at the image-token positions
        (in order: the k-th image token of the flattened batch takes the k-th row). Give
        pixel_values or precomputed (projected) image_features."""
        embeds = nn.with_logical_constraint(self.language_model.embed(input_ids), ACT_AXES)
        if image_features is None and pixel_values is None:
            if qformer_input_ids is not None:
                raise ValueError("qformer_input_ids were given without pixel_values")
            if self.is_initializing():
                self.image_features(_blank_image(self.cfg))  # creates every parameter
            return embeds
        feats = image_features if image_features is not None else self.image_features(
            pixel_values, qformer_input_ids, qformer_attention_mask)
        if feats.ndim == 3:
            check_image_tokens(input_ids, feats.shape[0], feats.shape[1],
                               self.cfg.image_token_index)
        merged = merge_image_features(embeds, input_ids, feats, self.cfg.image_token_index)
        return nn.with_logical_constraint(merged, ACT_AXES)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *,
                      image_features=None, segment_ids=None, position_ids=None,
                      qformer_input_ids=None, qformer_attention_mask=None):
        """Final (normed) hidden states of a decoder-only LLM [b, s, d]."""
        embeds = self.embed(input_ids, pixel_values, image_features=image_features,
                            qformer_input_ids=qformer_input_ids,
                            qformer_attention_mask=qformer_attention_mask)
        return self.language_model.decode(embeds, attention_mask, segment_ids, position_ids)

    def output_head(self):
        return self.language_model.output_head()

    def logits_from_hidden(self, h):
        return self.language_model.logits_from_hidden(h)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *,
                 qformer_input_ids=None, qformer_attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, segment_ids=None, position_ids=None):
        """Logits of the HF class for the same inputs: [b, s, vocab] for a decoder-only LLM,
        [b, decoder length, vocab] for an encoder-decoder one (`decoder_input_ids`)."""
        embeds = self.embed(input_ids, pixel_values, qformer_input_ids=qformer_input_ids,
                            qformer_attention_mask=qformer_attention_mask)
        extra = {k: v for k, v in dict(segment_ids=segment_ids, position_ids=position_ids,
                                       decoder_input_ids=decoder_input_ids,
                                       decoder_attention_mask=decoder_attention_mask).items()
                 if v is not None}
        return self.language_model(None, None, attention_mask, inputs_embeds=embeds, **extra)

    # ---- decoding: images enter at prefill; the cache is the LLM's ----------------------

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int) -> dict:
        return registry.language_model(self.cfg).init_cache(batch, max_len)

    @nn.nowrap
    def reorder_cache(self, cache, rows) -> dict:
        return registry.language_model(self.cfg).reorder_cache(cache, rows)

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None, *,
                qformer_input_ids=None, qformer_attention_mask=None):
        """As the LLM's `prefill`, with the images merged into the prompt embeddings."""
        embeds = self.embed(input_ids, pixel_values, qformer_input_ids=qformer_input_ids,
                            qformer_attention_mask=qformer_attention_mask)
        return self.language_model.prefill(None, attention_mask, cache, inputs_embeds=embeds)

    def decode_step(self, tokens, positions, kv_mask, cache):
        return self.language_model.decode_step(tokens, positions, kv_mask, cache)


def _blank_image(c):
    return jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels),
                     jnp.float32)


def tokens_per_image(cfg, image_size=None) -> int:
    """One image fills `num_query_tokens` image tokens, whatever its size."""
    del image_size
    return int(cfg.projector.num_query_tokens)


def train_flops(cfg, batch, seq, images_per_sample, trainable) -> float:
    """As LLaVA's count (`llava.train_flops`): each part forward once, its activation
    gradients when anything upstream trains, its weight gradients when it trains; the
    Q-Former, its query tokens and the projection are the connector."""
    trained = {"vision": "vision_model" in trainable,
               "connector": any(k in trainable for k in ("query_tokens", "qformer",
                                                         "language_projection")),
               "llm": "language_model" in trainable}
    total, upstream = 0.0, False
    if images_per_sample:
        n_img = batch * images_per_sample
        encoder = ENCODERS.get(cfg.vision.type)
        vis = (encoder.flops(cfg) if encoder.flops else 0.0) * n_img
        total += vis * (3 if trained["vision"] else 1)
        upstream = trained["vision"]
        tokens = encoder.tokens_per_image(cfg, None)
        d_in = encoder.feature_size(cfg) if encoder.feature_size else cfg.vision.hidden_size
        proj = CONNECTORS.get("qformer").flops(cfg, tokens, d_in) * n_img
        total += proj * (1 + int(upstream) + int(trained["connector"]))
        upstream = upstream or trained["connector"]
    return total + decoder_train_flops(cfg.text, seq, batch, upstream, trained["llm"])


def _register():
    from mllm_jax.models import blip2_hf
    for name in QFORMER_TYPES:
        registry.register_model(name, registry.ModelFamily(
            module=Blip2, config=lambda name=name, **kw: blip2_config(name, **kw),
            init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
            tokens_per_image=tokens_per_image,
            hf_model_types=lambda name=name: (blip2_hf.HF_MODEL_TYPES[name],),
            from_hf=lambda hf, where="config.json", name=name: blip2_hf.from_hf(
                hf, where, name),
            to_hf=blip2_hf.to_hf, key_aliases=blip2_hf.KEY_ALIASES,
            unused_keys=blip2_hf.unused_keys, train_flops=train_flops, check=blip2_hf.check,
            prompt_encoder=_prompt_encoder, sample_inputs=_sample_inputs,
            sample_input_keys=_sample_input_keys))


def _sample_input_keys(cfg):
    from mllm_jax.models.blip2_prompts import InstructionInputs
    return InstructionInputs.keys if cfg.model_type == "instructblip" else ()


def _sample_inputs(cfg, data_cfg):
    from mllm_jax.models.blip2_prompts import instruction_inputs
    return instruction_inputs(cfg, data_cfg)


def _prompt_encoder(cfg, checkpoint_dir):
    from mllm_jax.models.blip2_prompts import Blip2PromptEncoder
    return Blip2PromptEncoder(cfg, checkpoint_dir)


_register()
