"""The composed LLaVA model: vision tower -> projector -> features placed at the image-token
positions of the text embeddings -> LLM. Paths mirror HF's on-disk layout:
`vision_tower/vision_model/...`, `multi_modal_projector/...`, `language_model/model/...`,
`language_model/lm_head`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models.layers import dtype_of
from mllm_jax.models.llm import ACT_AXES, CausalLM
from mllm_jax.models.projector import MLPProjector
from mllm_jax.models.vit import VisionModel, select_features


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
        self.vision_tower = VisionModel(c)
        self.multi_modal_projector = MLPProjector(
            c.projector, c.text.hidden_size, dtype_of(c.dtype), dtype_of(c.param_dtype))
        self.language_model = CausalLM(c)

    def vision_features(self, pixel_values):
        """Selected vision-tower features, before the projector: [n_images, tokens, d_vis]."""
        c = self.cfg
        out = self.vision_tower(pixel_values)
        return select_features(out["hidden_states"], _layers(c.vision_feature_layer),
                               keep_cls=c.vision_feature_select_strategy == "full",
                               has_cls=c.vision.use_class_token)

    def project(self, vision_features):
        return self.multi_modal_projector(vision_features)

    def image_features(self, pixel_values):
        """[n_images, h, w, 3] -> projected features [n_images, tokens, text hidden];
        [b, max_images, h, w, 3] -> [b, max_images, tokens, text hidden]."""
        if pixel_values.ndim == 5:
            b, m = pixel_values.shape[:2]
            feats = self.image_features(pixel_values.reshape(b * m, *pixel_values.shape[2:]))
            return feats.reshape(b, m, *feats.shape[1:])
        return self.project(self.vision_features(pixel_values))

    def embed(self, input_ids, pixel_values=None, *, image_features=None):
        """Text embeddings with image features at the image-token positions. Give either
        pixel_values or precomputed (projected) image_features."""
        embeds = nn.with_logical_constraint(self.language_model.embed(input_ids), ACT_AXES)
        if image_features is None and pixel_values is None:
            if self.is_initializing():
                c = self.cfg
                self.image_features(jnp.zeros(
                    (1, c.vision.image_size, c.vision.image_size, c.vision.num_channels),
                    jnp.float32))  # creates the vision and projector parameters
            return embeds
        feats = image_features if image_features is not None else self.image_features(
            pixel_values)
        if feats.ndim == 3:
            check_image_tokens(input_ids, feats.shape[0], feats.shape[1],
                               self.cfg.image_token_index)
        if feats.ndim == 4:
            feats = nn.with_logical_constraint(
                feats, ("activation_batch", None, "activation_length", "activation_embed"))
        merged = merge_image_features(embeds, input_ids, feats, self.cfg.image_token_index)
        return nn.with_logical_constraint(merged, ACT_AXES)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *,
                      image_features=None, segment_ids=None, position_ids=None):
        """Final (normed) hidden states [b, s, d]; `logits_from_hidden` finishes the job."""
        embeds = self.embed(input_ids, pixel_values, image_features=image_features)
        return self.language_model.decode(embeds, attention_mask, segment_ids, position_ids)

    def output_head(self):
        return self.language_model.output_head()

    def logits_from_hidden(self, h):
        return self.language_model.logits_from_hidden(h)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, segment_ids=None,
                 position_ids=None):
        h = self.hidden_states(input_ids, pixel_values, attention_mask,
                               segment_ids=segment_ids, position_ids=position_ids)
        return self.logits_from_hidden(h)


def _layers(value):
    return value if isinstance(value, int) else tuple(value)
