"""Image preprocessing that reproduces HF's CLIP / LLaVA / LLaVA-NeXT image processors (the PIL
backends: CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil), NHWC float32.

The pipeline is a chain of small steps, each usable on its own:

  read_image(path)               PIL image, fully decoded; a failure names the file (a path, or
                                 an in-memory file: an object with .path and .data bytes)
  apply_exif_orientation(image)  rotate/flip by the EXIF orientation tag (a step HF's processors do
                                 NOT take for PIL inputs; HF's `load_image` for paths/URLs does)
  to_rgb(image)                  HF's convert_to_rgb: images with alpha or a transparency key
                                 are composited onto white, all other modes go through PIL
                                 convert("RGB") (16-bit and float images are clipped to 0..255
                                 by PIL, not rescaled)
  views by mode                  "crop" (CLIP), "pad" (LLaVA-1.5), "anyres" (LLaVA-NeXT) ->
                                 uint8 views
  _normalize(view)               (x * rescale_factor - mean) / std in HF's dtypes

The first three are `data.image_io`'s (reading images), importable from here too.
`ImageProcessorConfig` holds the HF processor fields; `load_image_processor_config(dir)` reads them
from a checkpoint directory.

Bounded work. However an input is shaped, preprocessing it holds at most a fixed multiple of
its own decoded pixels or of the target size, whichever is larger:
- `read_image` refuses images with more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (possible
  decompression bombs) before decoding them: `ImageRejected` with reason IMAGE_TOO_LARGE.
- "crop" and "pad" refuse images more elongated than `max_aspect_ratio` (default 50:1):
  `ImageRejected` with reason IMAGE_ASPECT_RATIO. Beyond 50:1 the centre crop keeps under 2% of
  the image, and padding to a square leaves a strip under 7 px thick at 336 px; HF's and
  LLaVA's processors have no such limit (HF's Qwen2-VL processor refuses beyond 200:1, but it
  keeps the whole image). "anyres" fits any image into its pinpoint canvas and has no limit.
- "crop" resizes the short side before cropping, so the long side of the resized image grows
  with the aspect ratio (a 6000x1 image at 336 px would be 2016000x336). When the resized
  image would exceed TARGET_SQUARES (64) target squares, only the crop's span of the long
  side is resampled (PIL's `box`): bounded, and close to but not bitwise HF's pixels (PIL
  rounds to uint8 between its two passes, whose order can differ). Within the default
  aspect limit no image gets there: every accepted image takes HF's path, bit for bit.
- "pad" pastes the image on a square of its long side, as HF does. An image more elongated
  than 8:1 whose square would exceed both TARGET_SQUARES target squares and PAD_PIXELS (2**24
  pixels, 48 MiB) is first reduced (PIL `reduce`, block means) to a long side of 4 to 8
  targets: its square stays under 64 target squares, not bitwise HF's pixels.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mllm_jax import storage
# Reading images has its own module; its names are this module's too.
from mllm_jax.data.image_io import (  # noqa: F401
    IMAGE_ASPECT_RATIO, IMAGE_TOO_LARGE, ImageReadError, ImageRejected, apply_exif_orientation,
    image_name, is_in_memory, read_image, read_image_size, to_pil, to_rgb)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("crop", "pad", "anyres")
# HF image processors that resize straight to `size` and have no center crop (their saved
# configs omit do_center_crop, which would otherwise default to CLIP's True).
NO_CENTER_CROP = ("SiglipImageProcessor",)
MAX_ASPECT_RATIO = 50.0
# Intermediates beyond this many target squares take the bounded paths (module docstring).
TARGET_SQUARES = 64
PAD_PIXELS = 2 ** 24


@dataclasses.dataclass
class ImageProcessorConfig:
    """The fields of an HF image processor config, plus `mode` and `exif_transpose`.

    size: {"shortest_edge": n} or {"height": h, "width": w} (an int means shortest_edge, a pair
    means (height, width), as HF's get_size_dict does for these processors).
    crop_size: {"height": h, "width": w} (an int means a square).
    image_grid_pinpoints: (height, width) pairs, the order HF's LlavaNextImageProcessor uses.
    max_aspect_ratio: "crop" and "pad" refuse images whose long side exceeds this many times
    the short side (None: no limit; see the module docstring). Read from a
    preprocessor_config.json that has it, like the HF fields.
    """
    mode: str = "crop"
    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)
    do_convert_rgb: bool = True
    image_grid_pinpoints: tuple | None = None
    exif_transpose: bool = True
    max_aspect_ratio: float | None = MAX_ASPECT_RATIO

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.size = _size_dict(self.size, square=False)
        self.crop_size = _size_dict(self.crop_size, square=True)
        if "height" not in self.crop_size:
            raise ValueError(f"crop_size needs height and width, got {self.crop_size}")
        self.image_mean = tuple(float(x) for x in np.broadcast_to(self.image_mean, (3,)))
        self.image_std = tuple(float(x) for x in np.broadcast_to(self.image_std, (3,)))
        self.resample = _resample(self.resample)
        if self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = tuple((int(h), int(w))
                                              for h, w in self.image_grid_pinpoints)
        if self.mode == "anyres" and not self.image_grid_pinpoints:
            raise ValueError("mode 'anyres' needs image_grid_pinpoints")
        if self.max_aspect_ratio is not None:
            self.max_aspect_ratio = float(self.max_aspect_ratio)
            if not self.max_aspect_ratio >= 1:
                raise ValueError(f"max_aspect_ratio must be >= 1 (or None: no limit), got "
                                 f"{self.max_aspect_ratio}")

    @classmethod
    def from_hf_dict(cls, d: dict, *, mode: str | None = None) -> "ImageProcessorConfig":
        """An HF preprocessor config dict -> config. Unknown keys are ignored; the mode follows
        from image_processor_type unless given."""
        kind = str(d.get("image_processor_type") or "")
        for suffix in ("Fast", "Pil"):
            kind = kind.removesuffix(suffix)
        if mode is None:
            if kind == "LlavaNextImageProcessor":
                mode = "anyres"
            elif kind == "LlavaImageProcessor" and d.get("do_pad"):
                mode = "pad"
            else:
                mode = "crop"
                if d.get("image_grid_pinpoints"):
                    warnings.warn(f"{kind or 'this processor'} has image_grid_pinpoints but is not "
                                  "LlavaNextImageProcessor; preprocessing as plain 'crop'",
                                  stacklevel=2)
        fields = {f.name for f in dataclasses.fields(cls)} - {"mode", "exif_transpose"}
        given = {k: v for k, v in d.items() if k in fields and v is not None}
        if kind in NO_CENTER_CROP:
            given.setdefault("do_center_crop", False)
        return cls(mode=mode, **given)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _size_dict(size, *, square: bool) -> dict:
    if isinstance(size, dict):
        d = {k: int(v) for k, v in size.items() if v is not None}
    elif isinstance(size, (int, np.integer)):
        d = {"height": int(size), "width": int(size)} if square else {"shortest_edge": int(size)}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        d = {"height": int(size[0]), "width": int(size[1])}
    else:
        raise ValueError(f"size must be an int, a (height, width) pair or a dict, got {size!r}")
    if set(d) not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(f"supported size keys are shortest_edge or height+width, got {size!r}")
    return d


def _resample(resample) -> int:
    if isinstance(resample, str):
        return int(Image.Resampling[resample.upper()])
    return int(Image.Resampling(int(resample)))


def as_image_config(config) -> ImageProcessorConfig:
    """``config`` as an `ImageProcessorConfig`: one is returned as is; a dict is read as an HF
    preprocessor config (plus the optional keys ``mode`` and ``exif_transpose``)."""
    if isinstance(config, ImageProcessorConfig):
        return config
    if isinstance(config, dict):
        mode = config.get("mode")
        config = {k: v for k, v in config.items() if k != "mode"}
        cfg = ImageProcessorConfig.from_hf_dict(config, mode=mode)
        if "exif_transpose" in config:
            cfg.exif_transpose = bool(config["exif_transpose"])
        return cfg
    raise TypeError(f"expected an ImageProcessorConfig or a dict, got {type(config).__name__}")


def load_image_processor_config(checkpoint_dir, *, mode: str | None = None) -> ImageProcessorConfig:
    """Read the image processor config of a local HF checkpoint directory.

    Looks where HF does: the "image_processor" entry of processor_config.json, else
    preprocessor_config.json. Original LLaVA checkpoints (a CLIP processor config plus
    `image_aspect_ratio` in config.json) get that aspect handling: "pad" or "anyres".
    """
    root = storage.as_path(checkpoint_dir) if storage.is_remote(checkpoint_dir) \
        else Path(checkpoint_dir)
    d = None
    if storage.isfile(root / "processor_config.json"):
        d = json.loads((root / "processor_config.json").read_text()).get("image_processor")
    if d is None:
        path = root / "preprocessor_config.json"
        if not storage.isfile(path):
            raise FileNotFoundError(f"no preprocessor_config.json (or processor_config.json with "
                                    f"an image_processor entry) in {root}")
        d = json.loads(path.read_text())
    kind = str(d.get("image_processor_type") or "").removesuffix("Fast").removesuffix("Pil")
    model_cfg = root / "config.json"
    if mode is None and kind not in ("LlavaImageProcessor", "LlavaNextImageProcessor") \
            and storage.isfile(model_cfg):
        cfg = json.loads(model_cfg.read_text())
        aspect = cfg.get("image_aspect_ratio")
        if aspect == "pad":
            mode = "pad"
        elif aspect == "anyres":
            mode = "anyres"
            if not d.get("image_grid_pinpoints"):
                # The LLaVA repo reads its pinpoints as (width, height); HF's as (height, width).
                d = dict(d, image_grid_pinpoints=[(h, w) for w, h in cfg["image_grid_pinpoints"]])
    return ImageProcessorConfig.from_hf_dict(d, mode=mode)


# ---------------------------------------------------------------- geometry (uint8 HWC arrays)


def resize_array(x: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """A uint8 [H, W, C] array resized by PIL to (height, width) with `resample`."""
    return np.asarray(Image.fromarray(x).resize((width, height), resample=resample))


def _shortest_edge_size(h: int, w: int, s: int) -> tuple[int, int]:
    # HF get_resize_output_image_size: the long side is truncated, not rounded.
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)
    return (new_long, s) if w <= h else (s, new_long)


def _resize_to(x: np.ndarray, size: dict, resample: int) -> np.ndarray:
    h, w = x.shape[:2]
    if "shortest_edge" in size:
        new_h, new_w = _shortest_edge_size(h, w, size["shortest_edge"])
    else:
        new_h, new_w = size["height"], size["width"]
    return resize_array(x, new_h, new_w, resample)


def _resize_and_crop(x: np.ndarray, s: int, crop_h: int, crop_w: int,
                     resample: int) -> np.ndarray:
    """`_center_crop(_resize_to(x, {"shortest_edge": s}), crop_h, crop_w)` without the whole
    resized image when it would exceed TARGET_SQUARES target squares (module docstring)."""
    h, w = x.shape[:2]
    new_h, new_w = _shortest_edge_size(h, w, s)
    if new_h * new_w <= TARGET_SQUARES * max(s, crop_h, crop_w) ** 2:
        return _center_crop(resize_array(x, new_h, new_w, resample), crop_h, crop_w)
    # Resample only the crop's span of the long side (PIL's box, in source coordinates).
    if new_w > new_h:
        left, scale = (new_w - crop_w) // 2, w / new_w
        box, size = (left * scale, 0, (left + crop_w) * scale, h), (crop_w, new_h)
    else:
        top, scale = (new_h - crop_h) // 2, h / new_h
        box, size = (0, top * scale, w, (top + crop_h) * scale), (new_w, crop_h)
    x = np.asarray(Image.fromarray(x).resize(size, resample=resample, box=box))
    return _center_crop(x, crop_h, crop_w)


def _reduce_for_pad(x: np.ndarray, target: int) -> np.ndarray:
    """`x` reduced (block means) when it is more elongated than 8:1 and its padded square
    would exceed TARGET_SQUARES target squares and PAD_PIXELS; as it is otherwise."""
    h, w = x.shape[:2]
    side = max(h, w)
    if side <= 8 * min(h, w) or side * side <= max(TARGET_SQUARES * target * target,
                                                   PAD_PIXELS):
        return x
    factor = max(1, side // (4 * target))
    return np.asarray(Image.fromarray(x).reduce(factor))


def check_aspect_ratio(width: int, height: int, cfg: ImageProcessorConfig, name=None) -> None:
    """`ImageRejected` (reason IMAGE_ASPECT_RATIO) for an image more elongated than
    `cfg.max_aspect_ratio` in modes "crop" and "pad"; `name` is used in the message."""
    limit = cfg.max_aspect_ratio
    if cfg.mode == "anyres" or limit is None:
        return
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > limit:
        what = f"image {name!r}" if name else "image"
        raise ImageRejected(
            IMAGE_ASPECT_RATIO,
            f"{what} is {width}x{height}, aspect ratio {ratio:.4g}:1, beyond the image "
            f"processor's max_aspect_ratio {limit:g}:1 (mode {cfg.mode!r}); crop or split the "
            f"image, or set max_aspect_ratio higher (or null for no limit) in the image "
            f"processor config (preprocessor_config.json)")


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """HF center_crop: top/left = (orig - crop) // 2; an image smaller than the crop is first
    zero-padded (ceil of half the shortfall before it)."""
    h, w = x.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return x[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w) + x.shape[2:], x.dtype)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = x
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def expand_to_square(x: np.ndarray, background) -> np.ndarray:
    """LLaVA's expand2square / HF LlavaImageProcessor.pad_to_square: paste centred
    (offset (long - short) // 2) on a square of the background colour."""
    h, w = x.shape[:2]
    if h == w:
        return x
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(background, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = x
    return out


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint keeping the most image pixels, then wasting the fewest.

    Same as HF/LLaVA, except that an image so elongated that every candidate keeps 0 pixels
    (HF returns None and fails) gets the candidate wasting the least.
    """
    best, best_effective, best_wasted = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def _resize_and_pad(x: np.ndarray, target_h: int, target_w: int, resample: int) -> np.ndarray:
    """Resize keeping aspect (the constrained side exactly, the other by ceil) and pad with black,
    centred with the odd pixel after, as HF's _resize_for_patching/_pad_for_patching."""
    h, w = x.shape[:2]
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        new_h, new_w = min(math.ceil(h * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.ceil(w * scale_h), target_w)
    x = resize_array(x, new_h, new_w, resample)
    out = np.zeros((target_h, target_w, 3), np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    out[top:top + new_h, left:left + new_w] = x
    return out


def _anyres_views(x: np.ndarray, cfg: ImageProcessorConfig) -> list[np.ndarray]:
    """LLaVA-NeXT: the base view (whole image squashed to the size square) first, then the tiles of
    the image resized-and-padded to the best pinpoint, row-major."""
    h, w = x.shape[:2]
    best_h, best_w = select_best_resolution(h, w, cfg.image_grid_pinpoints)
    canvas = _resize_and_pad(x, best_h, best_w, cfg.resample)
    tile = cfg.crop_size["height"]
    tiles = [canvas[i:i + tile, j:j + tile] for i in range(0, best_h, tile)
             for j in range(0, best_w, tile)]
    base_h, base_w = (cfg.size["height"], cfg.size["width"]) if "height" in cfg.size \
        else (cfg.size["shortest_edge"],) * 2
    return [resize_array(x, base_h, base_w, cfg.resample)] + tiles


def _normalize(x: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    # HF: rescale in float64 then cast to float32; normalize in float32.
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale \
        else x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x


# ---------------------------------------------------------------- entry points


def preprocess(image, config) -> np.ndarray:
    """One image (PIL image, path, or uint8 array) -> float32 NHWC-ready pixels.

    "crop"/"pad": [H, W, 3]; "anyres": [1 + num_tiles, H, W, 3] with the base view first.
    `config` is an ImageProcessorConfig or a dict of its / HF's fields.
    """
    cfg = as_image_config(config)
    name = image_name(image) if isinstance(image, (str, os.PathLike)) or is_in_memory(image) \
        else getattr(image, "filename", None)
    image = to_pil(image)
    check_aspect_ratio(image.width, image.height, cfg, name)
    if cfg.exif_transpose:
        image = apply_exif_orientation(image)
    if cfg.do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise ValueError(f"do_convert_rgb=False needs an RGB image, got mode {image.mode}")
    x = np.asarray(image)

    if cfg.mode == "anyres":
        views = _anyres_views(x, cfg)
    elif cfg.mode == "pad":
        target = cfg.size.get("shortest_edge") or max(cfg.size["height"], cfg.size["width"])
        views = [expand_to_square(_reduce_for_pad(x, target),
                                  tuple(int(m * 255) for m in cfg.image_mean))]
    else:
        views = [x]

    out = []
    crop_h, crop_w = cfg.crop_size["height"], cfg.crop_size["width"]
    for view in views:
        # LLaVA-NeXT resizes every view; the other processors follow do_resize.
        resize = cfg.do_resize or cfg.mode == "anyres"
        if resize and cfg.do_center_crop and "shortest_edge" in cfg.size:
            view = _resize_and_crop(view, cfg.size["shortest_edge"], crop_h, crop_w,
                                    cfg.resample)
        else:
            if resize:
                view = _resize_to(view, cfg.size, cfg.resample)
            if cfg.do_center_crop:
                view = _center_crop(view, crop_h, crop_w)
        out.append(_normalize(view, cfg))
    return np.stack(out) if cfg.mode == "anyres" else out[0]


def preprocess_batch(images, config) -> dict:
    """Several images -> {"pixel_values": [B, H, W, 3]} ("crop"/"pad") or, for "anyres",
    {"pixel_values": [B, max_views, H, W, 3] zero-padded on the views axis as HF does,
     "image_sizes": [B, 2] (height, width) of each upright RGB image}."""
    cfg = as_image_config(config)
    pixels, sizes = [], []
    for image in images:
        image = to_pil(image)
        if cfg.exif_transpose:
            image = apply_exif_orientation(image)
        sizes.append((image.height, image.width))
        pixels.append(preprocess(image, dataclasses.replace(cfg, exif_transpose=False)))
    if cfg.mode != "anyres":
        return {"pixel_values": np.stack(pixels)}
    most = max(p.shape[0] for p in pixels)
    pixels = [np.pad(p, ((0, most - p.shape[0]),) + ((0, 0),) * 3) for p in pixels]
    return {"pixel_values": np.stack(pixels), "image_sizes": np.asarray(sizes, np.int64)}


def preprocess_image(image, size: int, mean=CLIP_MEAN, std=CLIP_STD, *, mode: str = "crop",
                     image_grid_pinpoints=None) -> np.ndarray:
    """A PIL image (or a path to one) -> float32 [size, size, 3] ("crop", "pad") or
    [1 + tiles, size, size, 3] ("anyres"; pinpoints default to LLaVA-NeXT's pattern scaled to
    `size`: 1x2, 2x1, 2x2, 3x1, 1x3 tiles)."""
    if mode == "anyres" and image_grid_pinpoints is None:
        image_grid_pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size],
                                [3 * size, size], [size, 3 * size]]
    cfg = ImageProcessorConfig(mode=mode, size={"shortest_edge": size}, crop_size=size,
                               image_mean=mean, image_std=std,
                               image_grid_pinpoints=image_grid_pinpoints)
    return preprocess(image, cfg)
