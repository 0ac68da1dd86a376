"""LLaVA-NeXT (`model_type` llava_next, HF `LlavaNextForConditionalGeneration`): LLaVA's
encoder, connector and LLM over the anyres views of each image (the base view, then the
tiles of its best pinpoint; `data.image`'s "anyres" mode), the tiles' features laid out as
one grid, unpadded to the image's aspect ratio, each row closed by the learned
`image_newline` (`models.llava_next_grid`).

Inputs as HF's: `pixel_values` [n_images, views, h, w, c] (NHWC views, zero views past an
image's own count, as HF's processor pads them) and `image_sizes` [n_images, 2] (height,
width). Shapes stay static under `jax.jit`: every view given is encoded, and each image's
features are gathered into the most an image can have (from the pinpoints), then placed at
the image tokens in order. The number of image tokens depends on the image's size:
`tokens_per_image(cfg, (h, w))`, which HF's `LlavaNextProcessor` gives too.

Paths mirror HF's on-disk layout: `image_newline`, `vision_tower/...`,
`multi_modal_projector/...`, `language_model/...`.
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models import llava
from mllm_jax.models import llava_next_grid as grid_lib
from mllm_jax.models.decoders.llama import ACT_AXES
from mllm_jax.models.layers import dtype_of, with_axes
from mllm_jax.models.registry import ModelFamily, register_model

# LlavaNextConfig's default pinpoints, (height, width).
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_next_config(vision=None, text=None, projector=None, **overrides):
    c = mc.llava_config(vision=vision, text=text, projector=projector)
    c.model_type = "llava_next"
    c.image_grid_pinpoints = [list(p) for p in DEFAULT_PINPOINTS]
    c.update(overrides)
    return c


def _pinpoints(cfg):
    return tuple((int(h), int(w)) for h, w in cfg.image_grid_pinpoints)


def _geometry(cfg):
    """(tile resolution, patches per tile side, features per view)."""
    v = cfg.vision
    return v.image_size, v.image_size // v.patch_size, llava.tokens_per_image(cfg)


def max_views(cfg) -> int:
    """The most views (base view + tiles) an image gets from the pinpoints."""
    return grid_lib.max_tiles(_pinpoints(cfg), cfg.vision.image_size)


def image_feature_lengths(cfg, image_sizes) -> np.ndarray:
    """Features (image tokens) of images of sizes [n, 2] (height, width), on the host."""
    sizes = np.asarray(image_sizes, np.int64).reshape(-1, 2)
    if sizes.size and (sizes.min() < 1 or sizes.max() > grid_lib.MAX_IMAGE_SIDE):
        raise ValueError(f"image sizes must be in [1, {grid_lib.MAX_IMAGE_SIDE}] pixels, got "
                         f"{sizes.tolist()}")
    tile, grid, base = _geometry(cfg)
    lay = grid_lib.layout(sizes.astype(np.int32), _pinpoints(cfg), tile, grid)
    return grid_lib.feature_lengths(lay, base).astype(np.int64)


def tokens_per_image(cfg, image_size=None) -> int:
    """Image tokens of an image of `image_size` (h, w); default: the tower's square."""
    if image_size is None:
        image_size = (cfg.vision.image_size,) * 2
    return int(image_feature_lengths(cfg, [tuple(image_size)])[0])


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


class LlavaNext(llava.Llava):
    def setup(self):
        super().setup()
        d = self.cfg.text.hidden_size
        self.image_newline = self.param(
            "image_newline", with_axes(nn.initializers.normal(1 / math.sqrt(d)), ("embed",)),
            (d,), dtype_of(self.cfg.param_dtype))

    def packed_image_features(self, pixel_values, image_sizes):
        """[n, views, h, w, c] views + [n, 2] sizes -> (features [n, most, d], lengths [n]):
        each image's base-view tokens, then its unpadded grid row by row with a newline after
        each row; positions past an image's length hold zeros."""
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be [images, views, height, width, channels] "
                             f"(HF's [images, views, c, h, w] as NHWC), got shape "
                             f"{pixel_values.shape}")
        n, views = pixel_values.shape[:2]
        feats = self.project(self.vision_features(
            pixel_values.reshape(n * views, *pixel_values.shape[2:])))
        feats = feats.reshape(n, views, *feats.shape[1:])
        tile, grid, base = _geometry(self.cfg)
        if feats.shape[2] != base or base != grid * grid:
            raise ValueError(f"a view gives {feats.shape[2]} features; the grid needs "
                             f"{grid}x{grid}")
        pinpoints = _pinpoints(self.cfg)
        lay = grid_lib.layout(jnp.asarray(image_sizes), pinpoints, tile, grid)
        most = grid_lib.max_features(pinpoints, tile, grid, base)
        view, token, newline, valid = grid_lib.gather_plan(lay, base, grid, most)
        out = feats[jnp.arange(n)[:, None], jnp.minimum(view, views - 1), token]
        out = jnp.where(newline[..., None], self.image_newline.astype(out.dtype), out)
        out = jnp.where(valid[..., None], out, 0)
        return out, grid_lib.feature_lengths(lay, base)

    def embed(self, input_ids, pixel_values=None, image_sizes=None):
        """Text embeddings with each image's features at its image tokens, in order over
        the flattened batch (HF's masked_scatter); or, for pixel_values [b, max_images,
        views, h, w, c] (training batches), in order within each row."""
        embeds = nn.with_logical_constraint(self.language_model.embed(input_ids), ACT_AXES)
        if pixel_values is None:
            if self.is_initializing():
                s = self.cfg.vision.image_size
                self.packed_image_features(
                    jnp.zeros((1, 1, s, s, self.cfg.vision.num_channels), jnp.float32),
                    jnp.asarray([[s, s]], jnp.int32))
            return embeds
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes [images, 2] (height, width) with "
                             "pixel_values")
        if pixel_values.ndim == 6:
            return self._embed_per_sample(embeds, input_ids, pixel_values, image_sizes)
        if _is_concrete(input_ids, image_sizes):
            check_image_tokens(self.cfg, input_ids, image_sizes)
        feats, lengths = self.packed_image_features(pixel_values, image_sizes)
        b, s, d = embeds.shape
        is_image = (input_ids == self.cfg.image_token_index).reshape(-1)
        t = jnp.cumsum(is_image) - 1
        ends = jnp.cumsum(lengths)
        image = jnp.clip(jnp.sum(ends[None, :] <= t[:, None], axis=1), 0, feats.shape[0] - 1)
        pos = jnp.clip(t - (ends - lengths)[image], 0, feats.shape[1] - 1)
        gathered = feats[image, pos].astype(embeds.dtype)
        merged = jnp.where(is_image[:, None], gathered, embeds.reshape(-1, d))
        return nn.with_logical_constraint(merged.reshape(b, s, d), ACT_AXES)

    def _embed_per_sample(self, embeds, input_ids, pixel_values, image_sizes):
        """The training layout: pixel_values [b, max_images, views, h, w, c] and image_sizes
        [b, max_images, 2]; row i's k-th image token takes the k-th feature of its own
        images, in order (slots past a row's images are never reached), so batches shard
        along their first axis."""
        b, m = pixel_values.shape[:2]
        feats, lengths = self.packed_image_features(
            pixel_values.reshape(b * m, *pixel_values.shape[2:]),
            jnp.asarray(image_sizes).reshape(b * m, 2))
        feats = feats.reshape(b, m, *feats.shape[1:])
        lengths = lengths.reshape(b, m)
        is_image = input_ids == self.cfg.image_token_index
        t = jnp.cumsum(is_image, axis=1) - 1
        ends = jnp.cumsum(lengths, axis=1)
        image = jnp.clip(jnp.sum(ends[:, None, :] <= t[:, :, None], axis=-1), 0, m - 1)
        start = jnp.take_along_axis(ends - lengths, image, axis=1)
        pos = jnp.clip(t - start, 0, feats.shape[2] - 1)
        gathered = feats[jnp.arange(b)[:, None], image, pos].astype(embeds.dtype)
        merged = jnp.where(is_image[..., None], gathered, embeds)
        return nn.with_logical_constraint(merged, ACT_AXES)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, *,
                      image_sizes=None, segment_ids=None, position_ids=None):
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        return self.language_model.decode(embeds, attention_mask, segment_ids, position_ids)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, image_sizes=None,
                 segment_ids=None, position_ids=None):
        h = self.hidden_states(input_ids, pixel_values, attention_mask,
                               image_sizes=image_sizes, segment_ids=segment_ids,
                               position_ids=position_ids)
        return self.logits_from_hidden(h)

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None, image_sizes=None):
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        return self.language_model.prefill(None, attention_mask, cache, inputs_embeds=embeds)


def check_image_tokens(cfg, input_ids, image_sizes):
    """Raises when concrete inputs hold another number of image tokens than the images'
    features."""
    n_tokens = int(np.sum(np.asarray(input_ids) == cfg.image_token_index))
    lengths = image_feature_lengths(cfg, image_sizes)
    if n_tokens != int(lengths.sum()):
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_index}) but the "
            f"{len(lengths)} image(s) of sizes {np.asarray(image_sizes).tolist()} give "
            f"{int(lengths.sum())} features ({lengths.tolist()}); expand each image "
            "placeholder to tokens_per_image(cfg, (height, width)) image tokens")


# ---- HF LlavaNextConfig ----------------------------------------------------------------------


def check(cfg, where: str = "model config") -> None:
    """LLaVA's constraints, plus pinpoints that tile: (height, width) pairs of multiples of the
    tower's resolution, and views whose features fill a square grid."""
    llava.check(cfg, where)
    check_pinpoints(cfg.image_grid_pinpoints, cfg.vision.image_size, where)
    tile, grid, base = _geometry(cfg)
    if base != grid * grid:
        raise checks.InvalidConfigError(
            f"{where}: a view gives {base} features, but LLaVA-NeXT lays them out on a "
            f"{grid}x{grid} grid (vision_feature_select_strategy "
            f"{cfg.vision_feature_select_strategy!r} with a class token: use 'default')")


def check_pinpoints(pinpoints, tile, where) -> None:
    ok = isinstance(pinpoints, (list, tuple)) and len(pinpoints) > 0
    for p in pinpoints if ok else ():
        ok = ok and isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool)
            and 0 < x <= grid_lib.MAX_PINPOINT_SIDE and x % tile == 0 for x in p)
    if not ok:
        raise checks.InvalidConfigError(
            f"{where}: image_grid_pinpoints = {pinpoints!r} must be a non-empty list of "
            f"(height, width) pairs, each a multiple of the vision image_size {tile} and at "
            f"most {grid_lib.MAX_PINPOINT_SIDE}")


def llava_next_from_hf(hf: dict, where: str = "config.json"):
    base = llava.llava_from_hf(hf, where)
    cfg = llava_next_config(vision=base.vision, text=base.text, projector=base.projector)
    for key in ("image_token_index", "vision_feature_select_strategy", "image_seq_length",
                "vision_feature_layer"):
        cfg[key] = base[key]
    pinpoints = hf.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    check_pinpoints(pinpoints, cfg.vision.image_size, where)
    cfg.image_grid_pinpoints = [list(p) for p in pinpoints]
    return cfg


def llava_next_to_hf(cfg) -> dict:
    hf = llava.llava_to_hf(cfg)
    hf.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
              image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])
    return hf


KEY_ALIASES = llava.KEY_ALIASES + ((r"^model\.image_newline$", "image_newline"),)


def train_flops(cfg, batch, seq, images_per_sample, trainable) -> float:
    """LLaVA's count with every view of an image through the tower and the connector (the
    most views the pinpoints give: all of them are encoded, padded or not)."""
    return llava.train_flops(cfg, batch, seq, images_per_sample * max_views(cfg), trainable)


def prepare_image_inputs(cfg, input_ids, pixel_values, model_inputs):
    """For generation: the image tokens checked against `image_sizes`, and the views padded
    to the most the pinpoints give, so one compiled loop serves any image sizes."""
    image_sizes = model_inputs.get("image_sizes")
    if pixel_values is None:
        return None, model_inputs
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes [images, 2] (height, width) with "
                         "pixel_values")
    check_image_tokens(cfg, input_ids, image_sizes)
    pixel_values = np.asarray(pixel_values)
    if pixel_values.ndim != 5 or pixel_values.shape[1] > max_views(cfg):
        raise ValueError(f"pixel_values must be [images, views <= {max_views(cfg)}, height, "
                         f"width, channels], got shape {pixel_values.shape}")
    pad = max_views(cfg) - pixel_values.shape[1]
    pixel_values = np.pad(pixel_values, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    return jnp.asarray(pixel_values), {**model_inputs,
                                       "image_sizes": jnp.asarray(image_sizes, jnp.int32)}


class AnyresImages:
    """LLaVA-NeXT's images outside the model (`ModelFamily.image_inputs`): each image its
    anyres views ([1 + tiles, h, w, 3], `data.image`'s "anyres" mode) and its upright
    (height, width), which also give its token count; a batch's views zero-padded to
    `max_views(cfg)`, so generation compiles once whatever the images' sizes.

    The image processor config must tile with the model's pinpoints and tower resolution
    (HF's processor and model read them from different files); a config in another mode (a
    checkpoint with no LlavaNextImageProcessor config) becomes anyres with the model's
    pinpoints, as LlavaNextImageProcessor's defaults would."""

    sized = True

    def __init__(self, cfg, image_cfg=None):
        from mllm_jax.data import image as image_lib
        from mllm_jax.data.image_inputs import default_image_config
        self.cfg, self._image_lib = cfg, image_lib
        image_cfg = (default_image_config(cfg) if image_cfg is None
                     else image_lib.as_image_config(image_cfg))
        if image_cfg.mode != "anyres":
            image_cfg = dataclasses.replace(image_cfg, mode="anyres",
                                            image_grid_pinpoints=_pinpoints(cfg))
        tile = cfg.vision.image_size
        if (tuple(image_cfg.image_grid_pinpoints) != _pinpoints(cfg)
                or image_cfg.crop_size != {"height": tile, "width": tile}):
            raise ValueError(
                f"the image processor's image_grid_pinpoints "
                f"{[list(p) for p in image_cfg.image_grid_pinpoints]} and crop_size "
                f"{image_cfg.crop_size} must be the model's image_grid_pinpoints "
                f"{cfg.image_grid_pinpoints} and {tile} px tiles, or the image tokens will not "
                "match the views")
        self.image_cfg = image_cfg

    def tokens(self, size) -> int:
        return tokens_per_image(self.cfg, size)

    def encode(self, image) -> dict:
        """{"pixel_values": [1 + tiles, h, w, 3], "image_sizes": (height, width)} of a PIL
        image, sized as HF's processor reports it (after EXIF orientation, when the config
        applies it)."""
        cfg = self.image_cfg
        if cfg.exif_transpose:
            image = self._image_lib.apply_exif_orientation(image)
            cfg = dataclasses.replace(cfg, exif_transpose=False)
        return {"pixel_values": self._image_lib.preprocess(image, cfg),
                "image_sizes": np.asarray([image.height, image.width], np.int64)}

    def batch(self, encodings) -> dict:
        if not len(encodings):
            return {}
        most = max_views(self.cfg)
        views = [np.pad(e["pixel_values"], ((0, most - e["pixel_values"].shape[0]),)
                        + ((0, 0),) * 3) for e in encodings]
        return {"pixel_values": np.stack(views),
                "image_sizes": np.stack([e["image_sizes"] for e in encodings])}

    def tokens_of(self, encoding) -> int:
        return self.tokens(tuple(int(x) for x in encoding["image_sizes"]))

    def collate(self, rows, batch_size, max_images) -> dict:
        """pixel_values [batch, max_images, max_views, h, w, 3] (zeros past a row's images and
        an image's views) and image_sizes [batch, max_images, 2] (a tile's size in the empty
        slots: the model lays out their features after the row's image tokens)."""
        h, w = self.image_cfg.crop_size["height"], self.image_cfg.crop_size["width"]
        pixels = np.zeros((batch_size, max_images, max_views(self.cfg), h, w, 3), np.float32)
        sizes = np.full((batch_size, max_images, 2), self.cfg.vision.image_size, np.int32)
        for r, row in enumerate(rows):
            for k, e in enumerate(row):
                pixels[r, k, :e["pixel_values"].shape[0]] = e["pixel_values"]
                sizes[r, k] = e["image_sizes"]
        return {"pixel_values": pixels, "image_sizes": sizes}


register_model("llava_next", ModelFamily(
    module=LlavaNext, config=llava_next_config,
    init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
    tokens_per_image=tokens_per_image,
    hf_model_types=lambda: ("llava_next",), from_hf=llava_next_from_hf,
    to_hf=llava_next_to_hf, key_aliases=KEY_ALIASES, unused_keys=llava.unused_keys,
    train_flops=train_flops, check=check, prepare_image_inputs=prepare_image_inputs,
    image_inputs=AnyresImages, image_input_keys=lambda cfg: ("image_sizes",)))

