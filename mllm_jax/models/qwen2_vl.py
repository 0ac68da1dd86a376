"""Qwen2-VL (`model_type` qwen2_vl, HF `Qwen2VLForConditionalGeneration`) and Qwen2.5-VL
(`qwen2_5_vl`, `Qwen2_5_VLForConditionalGeneration`: window attention and RMSNorms in the
tower, the same LLM side): the native-resolution ViT (`models.qwen2_vl_vision`) whose
merged tokens replace the image tokens of the prompt, and the Qwen2 decoder with
multimodal RoPE (`models.mrope`).

    model, params = mllm_jax.load_hf(path)
    logits = model.apply({"params": params}, input_ids, pixel_values=patches,
                         image_grid_thw=grid, attention_mask=mask)

`pixel_values` are the HF processor's flattened patches [total_patches, C*T*P*P], taken as
they are; concrete patches (and grids) are padded to a bucket (`qwen2_vl_vision.pad_patches`;
generation does it before compiling) so that images of other sizes reuse the compiled
tower. Training batches may carry the images row by row instead (`pixel_values` [batch,
bucket, C*T*P*P] and `image_grid_thw` [batch, bucket / merge**2, 3], zero-padded,
`qwen2_vl_vision.pad_rows`), which shard over data-parallel devices with their rows.
Without `image_grid_thw` the positions are 0..seq-1, as HF's forward gives a text-only
batch.

Paths mirror the published checkpoints (which transformers 5 still writes): `visual/...`,
`model/{embed_tokens, layers_{i}, norm}`, `lm_head` (absent when tied); transformers 5's
in-memory names (`model.visual.*`, `model.language_model.*`) read as aliases.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models.decoders.llama import ACT_AXES, check_text
from mllm_jax.models.layers import Dense, dtype_of
from mllm_jax.models.llava import merge_image_features
from mllm_jax.models.llm import cache_kv_mask
from mllm_jax.models.mrope import rope_index
from mllm_jax.models.qwen2_vl_vision import (Qwen2VisionTransformer, flatten_rows, pad_patches,
                                             pad_rows, smart_resize, vision_forward_flops)
from mllm_jax.models.registry import (DECODERS, EncoderSpec, ModelFamily,
                                      UnsupportedModelError, decoder_train_flops,
                                      register_encoder, register_model)


def qwen2_vl_vision_config(**overrides) -> ml_collections.ConfigDict:
    """The ViT; defaults are transformers' `Qwen2VLVisionConfig`'s. `image_size`,
    `min_pixels` and `max_pixels` are the image processor's (the default image side for
    `tokens_per_image`, and smart_resize's pixel bounds); `patch_buckets` the static patch
    counts images are padded to (empty: powers of two)."""
    c = ml_collections.ConfigDict()
    c.type = "qwen2_vl_vision"
    c.depth = 32
    c.embed_dim = 1280
    c.hidden_size = 3584  # the LLM width the merger projects to
    c.hidden_act = "quick_gelu"
    c.mlp_ratio = 4
    c.num_heads = 16
    c.in_channels = 3
    c.num_channels = 3
    c.patch_size = 14
    c.spatial_merge_size = 2
    c.temporal_patch_size = 2
    c.rope_theta = 10000.0
    c.image_size = 448
    c.min_pixels = 56 * 56
    c.max_pixels = 28 * 28 * 1280
    c.patch_buckets = []
    # Qwen2.5-VL's settings of the same tower (see `qwen2_5_vl_vision_config`).
    c.norm = "layernorm"  # layernorm | rmsnorm
    c.mlp = "fc"  # fc: fc1/fc2 of embed_dim * mlp_ratio | gated: gate/up/down_proj
    c.intermediate_size = 0  # the gated MLP's width
    c.window_size = 0  # 0: every block attends over whole frames
    c.fullatt_block_indexes = []
    c.tokens_per_second = 4  # video positions (videos are not supported here)
    c.update(overrides)
    return c


def qwen2_5_vl_vision_config(**overrides) -> ml_collections.ConfigDict:
    """Qwen2.5-VL's ViT; defaults are transformers' `Qwen2_5_VLVisionConfig`'s (whose
    `hidden_size` is our `embed_dim` and `out_hidden_size` our `hidden_size`)."""
    d = dict(type="qwen2_5_vl_vision", embed_dim=3584, hidden_size=3584, hidden_act="silu",
             norm="rmsnorm", mlp="gated", intermediate_size=3420, window_size=112,
             fullatt_block_indexes=[7, 15, 23, 31])
    d.update(overrides)
    return qwen2_vl_vision_config(**d)


def qwen2_vl_config(vision=None, text=None, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_type = "qwen2_vl"
    c.vision = vision if vision is not None else qwen2_vl_vision_config()
    c.text = text if text is not None else qwen2_vl_text_config()
    c.image_token_id = 151655
    c.video_token_id = 151656
    c.vision_start_token_id = 151652
    c.vision_end_token_id = 151653
    mc.runtime_fields(c)
    c.update(overrides)
    return c


def qwen2_vl_text_config(**overrides) -> ml_collections.ConfigDict:
    """The Qwen2 decoder with M-RoPE; defaults are transformers' `Qwen2VLTextConfig`'s."""
    d = dict(model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
             num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
             max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
             qkv_bias=True, bos_token_id=151643, eos_token_id=151645)
    d.update(overrides)
    section = d.pop("mrope_section", [16, 24, 24])
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    c = mc.text_config(**d)
    c.mrope_section = list(section)
    return c


class Qwen2VL(nn.Module):
    cfg: Any

    def setup(self):
        c = self.cfg
        dtype, param_dtype = dtype_of(c.dtype), dtype_of(c.param_dtype)
        self.visual = Qwen2VisionTransformer(c.vision, dtype, param_dtype)
        self.model = DECODERS.get(c.text.model_type).module(
            c.text, dtype, param_dtype, c.scan_layers, c.remat_policy, c.get("attention", "xla"))
        if not c.text.tie_word_embeddings:
            self.lm_head = Dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=dtype, param_dtype=param_dtype)

    def image_features(self, pixel_values, image_grid_thw, *, bucketed=False):
        """Merged image tokens [patches / merge**2, d], image after image (then padding).
        `bucketed`: the patches are already padded (`flatten_rows`' output)."""
        if not bucketed and not isinstance(pixel_values, jax.core.Tracer) and not isinstance(
                image_grid_thw, jax.core.Tracer):
            pixel_values, image_grid_thw = pad_patches(pixel_values, image_grid_thw,
                                                       self.cfg.vision)
        return self.visual(jnp.asarray(pixel_values), jnp.asarray(image_grid_thw))

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, *, bucketed=False):
        embeds = nn.with_logical_constraint(self.model.embed(input_ids), ACT_AXES)
        if pixel_values is None:
            if self.is_initializing():
                self.image_features(*_blank_image(self.cfg))  # creates the tower's parameters
            return embeds
        if image_grid_thw is None:
            raise ValueError("pixel_values come with image_grid_thw (HF's processor gives both)")
        check_image_tokens(input_ids, image_grid_thw, self.cfg)
        feats = self.image_features(pixel_values, image_grid_thw, bucketed=bucketed)
        merged = merge_image_features(embeds, input_ids, feats[None], self.cfg.image_token_id)
        return nn.with_logical_constraint(merged, ACT_AXES)

    def positions(self, input_ids, image_grid_thw=None, attention_mask=None):
        """M-RoPE positions [3, b, s] and rope deltas [b] (`mrope.rope_index`)."""
        return rope_index(input_ids, image_grid_thw, attention_mask, self.cfg.image_token_id,
                          self.cfg.vision.spatial_merge_size)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *,
                      image_grid_thw=None, segment_ids=None, position_ids=None):
        pixel_values, image_grid_thw, bucketed = _flat_images(pixel_values, image_grid_thw)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, bucketed=bucketed)
        if position_ids is None and image_grid_thw is not None:
            position_ids = self.positions(input_ids, image_grid_thw, attention_mask)[0]
        return self.model(embeds, attention_mask, segment_ids, position_ids)

    def output_head(self):
        dtype = dtype_of(self.cfg.dtype)
        if self.cfg.text.tie_word_embeddings:
            return self.model.embedding_table().astype(dtype), True
        return self.lm_head.variables["params"]["kernel"].astype(dtype), False

    def logits_from_hidden(self, h):
        if self.cfg.text.tie_word_embeddings:
            return self.model.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *,
                 image_grid_thw=None, segment_ids=None, position_ids=None):
        h = self.hidden_states(input_ids, pixel_values, attention_mask,
                               image_grid_thw=image_grid_thw, segment_ids=segment_ids,
                               position_ids=position_ids)
        return self.logits_from_hidden(h)

    # ---- decoding: images and M-RoPE positions at prefill; then text positions ------------

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int) -> dict:
        c = self.cfg
        return DECODERS.get(c.text.model_type).init_cache(c.text, batch, max_len,
                                                          dtype_of(c.dtype), c.scan_layers)

    @nn.nowrap
    def reorder_cache(self, cache, rows) -> dict:
        c = self.cfg
        return DECODERS.get(c.text.model_type).reorder_cache(cache, rows, c.scan_layers)

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None, *,
                image_grid_thw=None):
        """As `CausalLM.prefill` (left-padded prompts), with the images merged and M-RoPE
        positions. The returned position of the last prompt token is its real-token index
        plus the sample's rope delta: decoding continues from it in all three rows (HF's
        `rope_deltas`), which is plain RoPE at that position."""
        pixel_values, image_grid_thw, bucketed = _flat_images(pixel_values, image_grid_thw)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, bucketed=bucketed)
        positions, deltas = self.positions(input_ids, image_grid_thw, attention_mask)
        max_len = cache["k"][0].shape[-2]
        h, cache = self.model(embeds, position_ids=positions, cache=cache,
                              kv_mask=cache_kv_mask(attention_mask, max_len), prefill=True)
        last = jnp.sum(attention_mask, axis=1, dtype=jnp.int32) - 1 + deltas
        return self.logits_from_hidden(h[:, -1]).astype(jnp.float32), cache, last

    def decode_step(self, tokens, positions, kv_mask, cache):
        h, cache = self.model(self.model.embed(tokens[:, None]),
                              position_ids=positions[:, None], cache=cache, kv_mask=kv_mask)
        return self.logits_from_hidden(h[:, 0]).astype(jnp.float32), cache


def _flat_images(pixel_values, image_grid_thw):
    """(patches, grids, bucketed): images given row by row (3-D `pixel_values`) in HF's
    flattened layout, already padded to their bucket; HF's layout as it is."""
    if pixel_values is None or jnp.ndim(pixel_values) != 3:
        return pixel_values, image_grid_thw, False
    if image_grid_thw is None:
        raise ValueError("pixel_values come with image_grid_thw (HF's processor gives both)")
    if jnp.ndim(image_grid_thw) != 3 or np.shape(image_grid_thw)[0] != np.shape(pixel_values)[0]:
        raise ValueError(f"row-by-row pixel_values {np.shape(pixel_values)} take "
                         f"image_grid_thw [batch, images, 3], got {np.shape(image_grid_thw)}")
    return (*flatten_rows(pixel_values, image_grid_thw), True)


def _blank_image(c):
    v = c.vision
    m = v.spatial_merge_size
    dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    return (jnp.zeros((m * m, dim), jnp.float32), jnp.asarray([[1, m, m]], jnp.int32))


def check_image_tokens(input_ids, image_grid_thw, cfg):
    """Raises when concrete inputs hold another number of image tokens than the grids
    give merged tokens."""
    if isinstance(input_ids, jax.core.Tracer) or isinstance(image_grid_thw, jax.core.Tracer):
        return
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    expected = int(np.prod(grid, axis=-1).sum()) // cfg.vision.spatial_merge_size ** 2
    n_tokens = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
    if n_tokens != expected:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but "
            f"image_grid_thw {grid.tolist()} gives {expected} merged tokens; expand each "
            "image placeholder to t*h*w / merge**2 image tokens, as HF's processor does")


def prepare_image_inputs(cfg, input_ids, pixel_values, model_inputs):
    """Checks concrete image inputs against the prompts and pads the patches to their
    bucket, before generation compiles: (pixel_values, model_inputs)."""
    grid = model_inputs.get("image_grid_thw")
    if pixel_values is None:
        return None, model_inputs
    if grid is None:
        raise ValueError("pixel_values come with image_grid_thw (HF's processor gives both)")
    check_image_tokens(input_ids, grid, cfg)
    pixel_values, grid = pad_patches(pixel_values, grid, cfg.vision)
    return jnp.asarray(pixel_values), {**model_inputs, "image_grid_thw": jnp.asarray(grid)}


class Qwen2VLImages:
    """Qwen2-VL's images outside the model (`ModelFamily.image_inputs`): each image HF's
    flattened patches and grid (`data.qwen2_vl_image`), its token count from its size after
    smart_resize. `image_cfg`: a `Qwen2VLImageConfig`, a dict of HF's processor fields, or
    None (the model's: `Qwen2VLImageConfig.for_model`); a `data.image.ImageProcessorConfig`
    (which has no pixel bounds) gives its rescale, normalize and colour settings with the
    model's bounds. The processor's patch, temporal and merge sizes must be the tower's."""

    sized = True

    def __init__(self, cfg, image_cfg=None):
        from mllm_jax.data import image as image_lib
        from mllm_jax.data import qwen2_vl_image as qimg
        self.cfg, self._qimg = cfg, qimg
        if image_cfg is None:
            image_cfg = qimg.Qwen2VLImageConfig.for_model(cfg)
        elif isinstance(image_cfg, image_lib.ImageProcessorConfig):
            image_cfg = qimg.Qwen2VLImageConfig.for_model(cfg, **{
                k: getattr(image_cfg, k) for k in (
                    "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                    "image_mean", "image_std", "do_convert_rgb", "exif_transpose")})
        else:
            image_cfg = qimg.as_qwen2_vl_config(image_cfg)
        v = cfg.vision
        ours = (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        theirs = (image_cfg.patch_size, image_cfg.temporal_patch_size, image_cfg.merge_size)
        if ours != theirs:
            raise ValueError(f"the image processor's (patch_size, temporal_patch_size, "
                             f"merge_size) {theirs} must be the tower's {ours}")
        self.image_cfg = image_cfg

    def tokens(self, size) -> int:
        return self._qimg.merged_tokens(size[0], size[1], self.image_cfg)

    def encode(self, image) -> dict:
        """{"patches": [grid_h * grid_w, C*T*P*P], "grid": (1, grid_h, grid_w)} of a PIL
        image; an image beyond 200:1 is refused (`ImageRejected`), as HF's processor
        refuses it."""
        from mllm_jax.data import image as image_lib
        size = self._qimg.image_size(image, self.image_cfg)
        ratio = max(size) / max(min(size), 1)
        if ratio > 200:
            raise image_lib.ImageRejected(
                image_lib.IMAGE_ASPECT_RATIO,
                f"image of {size[1]}x{size[0]} px has aspect ratio {ratio:.4g}:1; Qwen2-VL's "
                "processor takes at most 200:1")
        patches, grid = self._qimg.preprocess(image, self.image_cfg)
        return {"patches": patches, "grid": grid}

    def tokens_of(self, encoding) -> int:
        _, h, w = (int(x) for x in encoding["grid"])
        return h * w // self.image_cfg.merge_size ** 2

    def batch(self, encodings) -> dict:
        """HF's layout: the images' patches concatenated and their grids stacked (generation
        pads them to a bucket, `prepare_image_inputs`)."""
        if not encodings:
            return {}
        return {"pixel_values": np.concatenate([e["patches"] for e in encodings]),
                "image_grid_thw": np.stack([e["grid"] for e in encodings])}

    def collate(self, rows, batch_size, max_images) -> dict:
        """The training layout (`qwen2_vl_vision.pad_rows`): pixel_values [batch, bucket,
        C*T*P*P] and image_grid_thw [batch, bucket / merge**2, 3], each row's images first."""
        del max_images  # a row's grids fill the rows its bucket gives
        rows = [[(e["patches"], e["grid"]) for e in row] for row in rows]
        rows += [[] for _ in range(batch_size - len(rows))]
        pixel_values, grids = pad_rows(rows, self.cfg.vision)
        return {"pixel_values": pixel_values, "image_grid_thw": grids}


def image_config(cfg, checkpoint_dir):
    """The checkpoint's Qwen2-VL image processor config (`data.qwen2_vl_image`, its pixel
    bounds included), or None when the directory has no processor config."""
    from mllm_jax.data import qwen2_vl_image as qimg
    try:
        return qimg.load_qwen2_vl_image_config(checkpoint_dir)
    except FileNotFoundError:
        return None


def tokens_per_image(cfg, image_size=None) -> int:
    """Merged tokens of an image of `image_size` (h, w) (default: `vision.image_size`
    square) after the processor's smart_resize."""
    v = cfg.vision
    h, w = (v.image_size, v.image_size) if image_size is None else image_size
    factor = v.patch_size * v.spatial_merge_size
    rh, rw = smart_resize(int(h), int(w), factor, v.min_pixels, v.max_pixels)
    return (rh // factor) * (rw // factor)


def train_flops(cfg, batch, seq, images_per_sample, trainable) -> float:
    """As LLaVA's: the tower forward (thrice when trained) at the default image size, and
    the decoder's share (see `registry.decoder_train_flops`)."""
    trained_vision = "visual" in trainable
    total = 0.0
    if images_per_sample:
        patches = tokens_per_image(cfg) * cfg.vision.spatial_merge_size ** 2
        total += (vision_forward_flops(cfg.vision, patches) * batch * images_per_sample
                  * (3 if trained_vision else 1))
    return total + decoder_train_flops(cfg.text, seq, batch, trained_vision,
                                       "model" in trainable or "lm_head" in trainable)


# ---- HF Qwen2VLConfig ----------------------------------------------------------------------

_COMMON_VISION = ("depth", "hidden_act", "num_heads", "in_channels", "patch_size",
                  "spatial_merge_size", "temporal_patch_size")
# Per model_type: {HF vision_config field: our vision field}.
VISION_FIELDS = {
    "qwen2_vl": {**{k: k for k in _COMMON_VISION}, "embed_dim": "embed_dim",
                 "hidden_size": "hidden_size", "mlp_ratio": "mlp_ratio"},
    "qwen2_5_vl": {**{k: k for k in _COMMON_VISION}, "hidden_size": "embed_dim",
                   "out_hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                   "window_size": "window_size", "fullatt_block_indexes": "fullatt_block_indexes",
                   "tokens_per_second": "tokens_per_second"},
}
VISION_CONFIGS = {"qwen2_vl": qwen2_vl_vision_config, "qwen2_5_vl": qwen2_5_vl_vision_config}
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def _mrope(text_hf: dict, where: str):
    """(theta, mrope_section) from v5's `rope_parameters` or v4's rope_theta / rope_scaling
    ({"type": "mrope", "mrope_section": ...})."""
    params = text_hf.get("rope_parameters") or text_hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", text_hf.get("rope_theta", 1000000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise UnsupportedModelError(f"{where}: rope type {rope_type!r} is not supported for "
                                    "qwen2_vl (default / mrope)")
    return theta, list(params.get("mrope_section", [16, 24, 24]))


def qwen2_vl_from_hf(hf: dict, where: str = "config.json"):
    # Published (v4) config.json files keep the text fields at the top level.
    text_hf = hf.get("text_config") or {k: v for k, v in hf.items()
                                        if k not in ("vision_config", "model_type")}
    if not isinstance(text_hf, dict):
        raise checks.InvalidConfigError(f"{where}: text_config must be a JSON object")
    if text_hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{where}: use_sliding_window=true is not supported")
    defaults = qwen2_vl_text_config()
    theta, section = _mrope(text_hf, where + " text_config")
    fields = {k: text_hf.get(k, defaults[k]) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act",
        "bos_token_id", "eos_token_id", "pad_token_id")}
    fields["num_key_value_heads"] = text_hf.get("num_key_value_heads") or \
        fields["num_attention_heads"]
    if isinstance(fields["eos_token_id"], (list, tuple)):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    checks.positive_int(fields, "num_attention_heads", where + " text_config")
    checks.divides(fields, "num_attention_heads", "hidden_size", where + " text_config")
    text = qwen2_vl_text_config(**fields, rope_theta=float(theta), mrope_section=section,
                                head_dim=fields["hidden_size"] // fields["num_attention_heads"])
    text.rms_norm_eps = float(text.rms_norm_eps)
    text.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False)
                                    or text_hf.get("tie_word_embeddings", False))
    check_text(text, where + " text_config")
    model_type = hf.get("model_type", "qwen2_vl")
    vision_hf = dict(hf.get("vision_config") or {})
    make_vision = VISION_CONFIGS[model_type]
    vd = make_vision()
    vision = make_vision(**{ours: vision_hf.get(theirs, vd[ours])
                            for theirs, ours in VISION_FIELDS[model_type].items()})
    vision.fullatt_block_indexes = list(vision.fullatt_block_indexes)
    vision.in_channels = vision_hf.get("in_chans", vision.in_channels)
    vision.num_channels = vision.in_channels
    vrope = vision_hf.get("rope_parameters") or {}
    vision.rope_theta = float(vrope.get("rope_theta", vision_hf.get("rope_theta", 10000.0)))
    cfg = qwen2_vl_config(vision=vision, text=text, model_type=model_type)
    for k in ("image_token_id", "video_token_id", "vision_start_token_id",
              "vision_end_token_id"):
        cfg[k] = hf.get(k, cfg[k])
    check(cfg, where)
    return cfg


def qwen2_vl_to_hf(cfg) -> dict:
    t, v = cfg.text, cfg.vision
    if t.head_dim * t.num_attention_heads != t.hidden_size or not t.qkv_bias or t.o_bias:
        raise UnsupportedModelError("Qwen2-VL's text model has head_dim = hidden_size / heads, "
                                    "biases on q/k/v and none on o_proj")
    text = {
        "model_type": "qwen2_vl_text", "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                            "mrope_section": list(t.mrope_section)},
        "use_sliding_window": False, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    model_type = cfg.model_type
    text["model_type"] = f"{model_type}_text"
    vision = {"model_type": f"{model_type}_vision",
              **{theirs: v[ours] for theirs, ours in VISION_FIELDS[model_type].items()},
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = list(vision["fullatt_block_indexes"])
    return {"model_type": model_type, "architectures": [ARCHITECTURES[model_type]],
            "text_config": text, "vision_config": vision,
            "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
            "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings}


def check(cfg, where: str = "model config") -> None:
    v = cfg.vision
    for name in ("depth", "embed_dim", "hidden_size", "mlp_ratio", "num_heads", "in_channels",
                 "patch_size", "spatial_merge_size", "temporal_patch_size"):
        checks.positive_int(v, name, where + " vision")
    checks.divides(v, "num_heads", "embed_dim", where + " vision")
    checks.one_of(v, "norm", where + " vision", ("layernorm", "rmsnorm"))
    checks.one_of(v, "mlp", where + " vision", ("fc", "gated"))
    if v.mlp == "gated":
        checks.positive_int(v, "intermediate_size", where + " vision")
    if v.window_size and v.window_size // v.spatial_merge_size // v.patch_size < 1:
        raise checks.InvalidConfigError(
            f"{where} vision: window_size = {v.window_size} must span at least one merged "
            f"token (spatial_merge_size * patch_size = {v.spatial_merge_size * v.patch_size})")
    if v.hidden_size != cfg.text.hidden_size:
        raise checks.InvalidConfigError(
            f"{where}: vision.hidden_size = {v.hidden_size} must equal the text width "
            f"{cfg.text.hidden_size} (the merger projects to it)")
    if sum(cfg.text.mrope_section) != cfg.text.head_dim // 2:
        raise checks.InvalidConfigError(
            f"{where}: text mrope_section {list(cfg.text.mrope_section)} must sum to head_dim "
            f"// 2 = {cfg.text.head_dim // 2}")
    check_text(cfg.text, where + " text")
    checks.token_id(cfg, "image_token_id", where, optional=False)


# transformers 5's in-memory names, as some tools save them.
KEY_ALIASES = ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model."))
# One image in a prompt, as Qwen2-VL's chat template writes it (the placeholder becomes the
# image's merged tokens).
IMAGE_TEXT = "<|vision_start|><image><|vision_end|>"


def _unused_keys(cfg) -> list:
    return [r"^lm_head\.weight$"] if cfg.text.tie_word_embeddings else []


register_encoder("qwen2_vl_vision", EncoderSpec(
    # Its module takes HF's flattened patches and grid_thw, not NHWC pixels: Qwen2-VL's own.
    module=lambda cfg: Qwen2VisionTransformer(cfg.vision, dtype_of(cfg.dtype),
                                              dtype_of(cfg.param_dtype)),
    config=qwen2_vl_vision_config, tokens_per_image=tokens_per_image,
    flops=lambda cfg: vision_forward_flops(
        cfg.vision, tokens_per_image(cfg) * cfg.vision.spatial_merge_size ** 2),
    feature_size=lambda cfg: cfg.vision.hidden_size))

register_encoder("qwen2_5_vl_vision", EncoderSpec(
    module=lambda cfg: Qwen2VisionTransformer(cfg.vision, dtype_of(cfg.dtype),
                                              dtype_of(cfg.param_dtype)),
    config=qwen2_5_vl_vision_config, tokens_per_image=tokens_per_image,
    flops=lambda cfg: vision_forward_flops(
        cfg.vision, tokens_per_image(cfg) * cfg.vision.spatial_merge_size ** 2),
    feature_size=lambda cfg: cfg.vision.hidden_size))


def qwen2_5_vl_config(vision=None, text=None, **overrides) -> ml_collections.ConfigDict:
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL with window attention
    and RMSNorms in the tower."""
    return qwen2_vl_config(vision=vision if vision is not None else qwen2_5_vl_vision_config(),
                           text=text, **{"model_type": "qwen2_5_vl", **overrides})


for _name, _config in (("qwen2_vl", qwen2_vl_config), ("qwen2_5_vl", qwen2_5_vl_config)):
    register_model(_name, ModelFamily(
        module=Qwen2VL, config=_config,
        init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
        tokens_per_image=tokens_per_image, image_token_id=lambda cfg: cfg.image_token_id,
        hf_model_types=lambda _n=_name: (_n,), from_hf=qwen2_vl_from_hf, to_hf=qwen2_vl_to_hf,
        key_aliases=KEY_ALIASES, unused_keys=_unused_keys, train_flops=train_flops,
        check=check, prepare_image_inputs=prepare_image_inputs,
        image_inputs=Qwen2VLImages, image_input_keys=lambda cfg: ("image_grid_thw",),
        image_config=image_config, image_text=lambda cfg: IMAGE_TEXT))
