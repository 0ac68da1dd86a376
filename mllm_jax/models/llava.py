"""The composed LLaVA model (`model_type` llava): encoder -> connector -> features placed at
the image-token positions of the text embeddings -> LLM. The encoder is
`ENCODERS[cfg.vision.type]`, the connector `CONNECTORS[cfg.projector.type]`, the LLM a
`CausalLM` over `DECODERS[cfg.text.model_type]`, so a LLaVA-style model with another tower or
connector is a config change. Paths mirror HF's on-disk layout: `vision_tower/...`,
`multi_modal_projector/...`, `language_model/model/...`, `language_model/lm_head`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models.decoders.llama import ACT_AXES
from mllm_jax.models.llm import CausalLM
from mllm_jax.models.registry import (CONNECTORS, DECODERS, ENCODERS, ModelFamily,
                                      UnsupportedModelError, decoder_train_flops,
                                      encoder_for_hf, register_model)


def merge_image_features(embeds, input_ids, image_features, image_token_index):
    """Places image features, in order, at the image-token positions (HF's masked_scatter).

    embeds: [b, s, d]; image_features: [n_images, n_tokens, d] (HF's layout: the k-th image
    token of the flattened batch receives the k-th feature row, any number of images per
    sample) or [b, max_images, n_tokens, d] (the training layout, see below). Shapes are
    static; `check_image_tokens` verifies the counts when inputs are concrete.
    """
    b, s, d = embeds.shape
    is_image = input_ids == image_token_index
    if image_features.ndim == 4:
        # Per-sample images [b, max_images, n_tokens, d] (padded): sample i's k-th image
        # token takes row k of its own images, so batches shard along their first axis.
        feats = image_features.reshape(b, -1, d).astype(embeds.dtype)
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
        gathered = jnp.take_along_axis(feats, index[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, embeds)
    feats = image_features.reshape(-1, d).astype(embeds.dtype)
    flat = is_image.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, feats.shape[0] - 1)
    gathered = jnp.take(feats, index, axis=0)
    merged = jnp.where(flat[:, None], gathered, embeds.reshape(-1, d))
    return merged.reshape(b, s, d)


def check_image_tokens(input_ids, num_images, tokens_per_image, image_token_index):
    """Raises when concrete inputs hold a different number of image tokens than features."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_index))
    expected = num_images * tokens_per_image
    if n_tokens != expected:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {image_token_index}) but "
            f"{num_images} image(s) give {expected} features ({tokens_per_image} each); expand "
            "each image placeholder to that many image tokens")


class Llava(nn.Module):
    cfg: Any  # llava config

    def setup(self):
        c = self.cfg
        self.vision_tower = ENCODERS.get(c.vision.type).module(c)
        self.multi_modal_projector = CONNECTORS.get(c.projector.type).module(c)
        self.language_model = CausalLM(c)

    def vision_features(self, pixel_values):
        """Encoder features, before the connector: [n_images, tokens, d_vis]."""
        return self.vision_tower(pixel_values)

    def project(self, vision_features, **connector_inputs):
        """The connector; `connector_inputs` are the per-image inputs some connectors read
        besides the features (an instruction-aware Q-Former's `qformer_input_ids` and
        `qformer_attention_mask`, see `ConnectorSpec.sample_input_keys`)."""
        return self.multi_modal_projector(vision_features, **connector_inputs)

    def image_features(self, pixel_values, **connector_inputs):
        """[n_images, h, w, c] -> projected features [n_images, tokens, text hidden];
        [b, max_images, h, w, c] -> [b, max_images, tokens, text hidden] (with connector
        inputs [b, ...]: one image per sample)."""
        if pixel_values.ndim == 5:
            b, m = pixel_values.shape[:2]
            if connector_inputs and m != 1:
                raise ValueError(
                    f"{sorted(connector_inputs)} come one per sample, and the samples hold "
                    f"{m} images each: the connector reads them per image; give one image "
                    "per sample (data.images=1)")
            feats = self.image_features(pixel_values.reshape(b * m, *pixel_values.shape[2:]),
                                        **connector_inputs)
            return feats.reshape(b, m, *feats.shape[1:])
        return self.project(self.vision_features(pixel_values), **connector_inputs)

    def embed(self, input_ids, pixel_values=None, *, image_features=None,
              **connector_inputs):
        """Text embeddings with image features at the image-token positions. Give either
        pixel_values (and the connector's inputs) or precomputed (projected)
        image_features."""
        embeds = nn.with_logical_constraint(self.language_model.embed(input_ids), ACT_AXES)
        if image_features is None and pixel_values is None:
            if self.is_initializing():
                self.image_features(_blank_image(self.cfg))  # creates the tower's parameters
            return embeds
        feats = image_features if image_features is not None else self.image_features(
            pixel_values, **connector_inputs)
        if feats.ndim == 3:
            check_image_tokens(input_ids, feats.shape[0], feats.shape[1],
                               self.cfg.image_token_index)
        if feats.ndim == 4:
            feats = nn.with_logical_constraint(
                feats, ("activation_batch", None, "activation_length", "activation_embed"))
        merged = merge_image_features(embeds, input_ids, feats, self.cfg.image_token_index)
        return nn.with_logical_constraint(merged, ACT_AXES)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *,
                      image_features=None, segment_ids=None, position_ids=None,
                      **connector_inputs):
        """Final (normed) hidden states [b, s, d]; `logits_from_hidden` finishes the job."""
        embeds = self.embed(input_ids, pixel_values, image_features=image_features,
                            **connector_inputs)
        return self.language_model.decode(embeds, attention_mask, segment_ids, position_ids)

    def output_head(self):
        return self.language_model.output_head()

    def logits_from_hidden(self, h):
        return self.language_model.logits_from_hidden(h)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, segment_ids=None,
                 position_ids=None, **connector_inputs):
        h = self.hidden_states(input_ids, pixel_values, attention_mask,
                               segment_ids=segment_ids, position_ids=position_ids,
                               **connector_inputs)
        return self.logits_from_hidden(h)

    # ---- decoding: images enter at prefill; the cache is the LLM's ----------------------

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int) -> dict:
        return CausalLM(self.cfg).init_cache(batch, max_len)

    @nn.nowrap
    def reorder_cache(self, cache, rows) -> dict:
        return CausalLM(self.cfg).reorder_cache(cache, rows)

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None,
                **connector_inputs):
        """As `CausalLM.prefill`, with the images merged into the prompt embeddings."""
        embeds = self.embed(input_ids, pixel_values, **connector_inputs)
        return self.language_model.prefill(None, attention_mask, cache, inputs_embeds=embeds)

    def decode_step(self, tokens, positions, kv_mask, cache):
        return self.language_model.decode_step(tokens, positions, kv_mask, cache)


def _blank_image(c):
    return jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels),
                     jnp.float32)


def tokens_per_image(cfg, image_size=None) -> int:
    """The encoder's tokens per image, through the connector."""
    tokens = ENCODERS.get(cfg.vision.type).tokens_per_image(cfg, image_size)
    return CONNECTORS.get(cfg.projector.type).tokens_out(cfg, tokens)


# ---- HF LlavaConfig --------------------------------------------------------------------------

# LlavaConfig's default vision tower (CLIP ViT-L/14-336) when config.json gives none.
LLAVA_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14)


def check_llava_fields(c, where: str = "model config") -> None:
    """LLaVA's own fields (a config or a dict of them; `vision_layers`: the tower's depth,
    None for an encoder without layers to select)."""
    checks.token_id(c, "image_token_index", where, optional=False)
    checks.positive_int(c, "image_seq_length", where)
    checks.one_of(c, "vision_feature_select_strategy", where, ("default", "full"))
    layer, n = c["vision_feature_layer"], c["vision_layers"]
    layers = [layer] if isinstance(layer, int) else layer
    if not (isinstance(layers, (list, tuple)) and layers
            and all(isinstance(i, int) and not isinstance(i, bool)
                    and (n is None or -(n + 1) <= i <= n) for i in layers)):
        tower = "an integer" if n is None else (
            f"a layer of the {n}-layer vision tower (an integer from {-(n + 1)} to {n}")
        raise checks.InvalidConfigError(
            f"{where}: vision_feature_layer = {layer!r} must be {tower}, or a list of them"
            f"{'' if n is None else ')'}")


def check(cfg, where: str = "model config") -> None:
    """The encoder's, the decoder's and LLaVA's own constraints on a composed config."""
    encoder, decoder = ENCODERS.get(cfg.vision.type), DECODERS.get(cfg.text.model_type)
    if encoder.check is not None:
        encoder.check(cfg.vision, f"{where} vision")
    if decoder.check is not None:
        decoder.check(cfg.text, f"{where} text")
    check_llava_fields({**{k: cfg[k] for k in ("image_token_index", "image_seq_length",
                                              "vision_feature_select_strategy",
                                              "vision_feature_layer")},
                        "vision_layers": cfg.vision.get("num_hidden_layers")}, where)


def llava_from_hf(hf: dict, where: str = "config.json"):
    text_hf = hf.get("text_config") or {}
    if not isinstance(text_hf, dict):
        raise checks.InvalidConfigError(f"{where}: text_config must be a JSON object, not "
                                        f"{text_hf!r}")
    text = DECODERS.get(text_hf.get("model_type", "llama")).from_hf(
        text_hf, where + " text_config")
    # LlavaConfig uses its ViT-L/14-336 defaults only when vision_config is absent; a
    # given (even partial or empty) vision_config is completed with the defaults of its
    # model_type's config class (CLIPVisionConfig's when it names none).
    vision_hf = hf.get("vision_config")
    vision_type = (vision_hf.get("model_type", "clip_vision_model")
                   if isinstance(vision_hf, dict) else "clip_vision_model")
    vision = encoder_for_hf(vision_type, where + " vision_config")[1].from_hf(
        vision_hf or {}, where + " vision_config",
        defaults=LLAVA_VISION_DEFAULTS if vision_hf is None else None)
    layer = hf.get("vision_feature_layer", -2)
    check_llava_fields(dict(
        image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)),
        image_seq_length=hf.get("image_seq_length", 576), vision_feature_layer=layer,
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        vision_layers=vision.num_hidden_layers), where)
    cfg = mc.llava_config(
        vision=vision, text=text,
        projector=mc.projector_config(type="mlp2x_gelu",
                                      bias=bool(hf.get("multimodal_projector_bias", True)),
                                      hidden_act=hf.get("projector_hidden_act", "gelu")),
        image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)),
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        image_seq_length=hf.get("image_seq_length", 576),
    )
    cfg.vision_feature_layer = layer if isinstance(layer, int) else list(layer)
    # LlavaForConditionalGeneration ties on the top-level flag, which LlavaConfig sets when
    # either it or text_config's flag is true.
    cfg.text.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False)
                                        or cfg.text.tie_word_embeddings)
    return cfg


def llava_to_hf(cfg) -> dict:
    if cfg.projector.type != "mlp2x_gelu":
        raise UnsupportedModelError(
            f"projector type {cfg.projector.type!r} has no HF LlavaForConditionalGeneration "
            "equivalent (it has mlp2x_gelu only)")
    encoder = ENCODERS.get(cfg.vision.type)
    if encoder.to_hf is None:
        raise UnsupportedModelError(
            f"encoder {cfg.vision.type!r} has no HF vision_config mapping; save_hf cannot "
            "write this model (save_orbax can)")
    layer = cfg.vision_feature_layer
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": encoder.to_hf(cfg.vision),
        "text_config": DECODERS.get(cfg.text.model_type).to_hf(cfg.text),
        "image_token_index": cfg.image_token_index,
        "projector_hidden_act": cfg.projector.get("hidden_act", "gelu"),
        "multimodal_projector_bias": cfg.projector.bias,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
        "image_seq_length": cfg.image_seq_length,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


# Checkpoint key spellings of recent transformers versions (in-memory names saved as is).
KEY_ALIASES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
)


def unused_keys(cfg) -> list:
    return [r"(^|\.)lm_head\.weight$"] if cfg.text.tie_word_embeddings else []


def train_flops(cfg, batch, seq, images_per_sample, trainable) -> float:
    """Each part counts its forward pass once, its activation gradients once more when
    anything upstream of it is trained, and its weight gradients once more when it is
    trained itself: a frozen encoder is counted forward-only; a frozen LLM under a trained
    connector forward plus activation gradients. Parts without a FLOP count add nothing."""
    trained = {"vision": "vision_tower" in trainable,
               "projector": "multi_modal_projector" in trainable,
               "llm": "language_model" in trainable}
    total, upstream = 0.0, False
    if images_per_sample:
        n_img = batch * images_per_sample
        encoder = ENCODERS.get(cfg.vision.type)
        connector = CONNECTORS.get(cfg.projector.type)
        vis = (encoder.flops(cfg) if encoder.flops else 0.0) * n_img
        total += vis * (3 if trained["vision"] else 1)
        upstream = trained["vision"]
        if connector.flops and encoder.feature_size:
            tokens = encoder.tokens_per_image(cfg, None)
            proj = connector.flops(cfg, tokens, encoder.feature_size(cfg)) * n_img
            total += proj * (1 + int(upstream) + int(trained["projector"]))
        upstream = upstream or trained["projector"]
    return total + decoder_train_flops(cfg.text, seq, batch, upstream, trained["llm"])


register_model("llava", ModelFamily(
    module=Llava, config=mc.llava_config,
    init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
    tokens_per_image=tokens_per_image,
    hf_model_types=lambda: ("llava",), from_hf=llava_from_hf, to_hf=llava_to_hf,
    key_aliases=KEY_ALIASES, unused_keys=unused_keys, train_flops=train_flops,
    check=check,
    sample_inputs=lambda cfg, data_cfg: _connector_sample_inputs(cfg, data_cfg),
    sample_input_keys=lambda cfg: CONNECTORS.get(cfg.projector.type).sample_input_keys(cfg)))


def _connector_sample_inputs(cfg, data_cfg):
    make = CONNECTORS.get(cfg.projector.type).sample_inputs
    return None if make is None else make(cfg, data_cfg)
