"""Qwen2-VL's image processor (transformers' `Qwen2VLImageProcessorPil`, the PIL/numpy backend
`AutoImageProcessor` picks when torchvision is not installed; the torchvision backend
resamples with its own bicubic and differs from it by a few 1e-3).

One image becomes HF's flattened patches and its grid:

  RGB (`data.image.to_rgb`, after the EXIF orientation when `exif_transpose`)
  -> smart_resize: both sides multiples of patch_size * merge_size, the pixel count within
     [min_pixels, max_pixels], resampled bicubic by PIL on uint8
  -> rescale (float64, then float32) and normalize (float32) with the CLIP mean / std
  -> the image repeated to temporal_patch_size frames and cut into patches in merge-window
     order: [grid_h * grid_w, C * T * P * P] (channel, frame, row, column within a patch)
     and the grid (1, grid_h, grid_w).

`preprocess_batch` concatenates the images' patches and stacks their grids, as HF's
processor returns `pixel_values` and `image_grid_thw`; the model takes both unchanged
(`models.qwen2_vl`), and an image's merged tokens, grid_h * grid_w / merge_size**2, are
`registry.tokens_per_image(cfg, (height, width))` of a model configured with the same
pixel bounds.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mllm_jax import storage
from mllm_jax.data import image as image_lib
from mllm_jax.models.qwen2_vl_vision import smart_resize

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


@dataclasses.dataclass
class Qwen2VLImageConfig:
    """The fields of HF's Qwen2-VL image processor (`from_hf_dict` reads its JSON), plus
    `exif_transpose` (see `data.image.apply_exif_orientation`)."""
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    do_resize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = image_lib.CLIP_MEAN
    image_std: tuple = image_lib.CLIP_STD
    do_convert_rgb: bool = True
    exif_transpose: bool = True

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
                     "merge_size"):
            value = int(getattr(self, name))
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
            setattr(self, name, value)
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        self.image_mean = tuple(float(x) for x in np.broadcast_to(self.image_mean, (3,)))
        self.image_std = tuple(float(x) for x in np.broadcast_to(self.image_std, (3,)))
        if isinstance(self.resample, str):
            self.resample = int(Image.Resampling[self.resample.upper()])
        self.resample = int(Image.Resampling(int(self.resample)))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "image processor config"):
        """An HF preprocessor config dict -> config. The pixel bounds are read as HF's
        `__init__` does: `min_pixels` / `max_pixels` when given, else `size`'s
        `shortest_edge` / `longest_edge` (transformers 5's spelling; `size.min_pixels` /
        `size.max_pixels` as some older files wrote them), else the defaults. Unknown keys
        are ignored."""
        size = d.get("size")
        bounds = {"min_pixels": None, "max_pixels": None}
        if size is not None:
            if not isinstance(size, dict):
                raise ValueError(f"{where}: size must be an object with shortest_edge and "
                                 f"longest_edge (pixel counts), got {size!r}")
            bounds["min_pixels"] = size.get("shortest_edge", size.get("min_pixels"))
            bounds["max_pixels"] = size.get("longest_edge", size.get("max_pixels"))
        for key in bounds:
            if d.get(key) is not None:
                bounds[key] = d[key]
        if size is not None and None in bounds.values():
            raise ValueError(f"{where}: size {size!r} needs both shortest_edge and longest_edge "
                             "(or min_pixels and max_pixels beside it), as HF's processor does")
        fields = {f.name for f in dataclasses.fields(cls)} - {"exif_transpose"}
        kw = {k: v for k, v in d.items() if k in fields and v is not None}
        kw.update({k: v for k, v in bounds.items() if v is not None})
        return cls(**kw)

    @classmethod
    def for_model(cls, cfg, **overrides):
        """The processor a Qwen2-VL model config implies: its tower's patch, temporal and
        merge sizes and its pixel bounds (`vision.min_pixels` / `vision.max_pixels`, the ones
        `tokens_per_image` counts with)."""
        v = cfg.vision
        kw = dict(min_pixels=v.min_pixels, max_pixels=v.max_pixels, patch_size=v.patch_size,
                  temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_qwen2_vl_config(config) -> Qwen2VLImageConfig:
    """A `Qwen2VLImageConfig` as is; a dict read as an HF preprocessor config (plus the
    optional `exif_transpose`)."""
    if isinstance(config, Qwen2VLImageConfig):
        return config
    if isinstance(config, dict):
        cfg = Qwen2VLImageConfig.from_hf_dict(config)
        if "exif_transpose" in config:
            cfg.exif_transpose = bool(config["exif_transpose"])
        return cfg
    raise TypeError(f"expected a Qwen2VLImageConfig or a dict, got {type(config).__name__}")


def load_qwen2_vl_image_config(checkpoint_dir) -> Qwen2VLImageConfig:
    """The image processor config of a local HF checkpoint directory, where HF looks: the
    "image_processor" entry of processor_config.json, else preprocessor_config.json."""
    root = storage.as_path(checkpoint_dir) if storage.is_remote(checkpoint_dir) \
        else Path(checkpoint_dir)
    for name, entry in (("processor_config.json", "image_processor"),
                        ("preprocessor_config.json", None)):
        path = root / name
        if storage.isfile(path):
            d = json.loads(path.read_text())
            d = d.get(entry) if entry else d
            if d is not None:
                if not isinstance(d, dict):
                    raise ValueError(f"{path}: the image processor config must be an object")
                return Qwen2VLImageConfig.from_hf_dict(d, where=str(path))
    raise FileNotFoundError(f"no preprocessor_config.json (or processor_config.json with an "
                            f"image_processor entry) in {root}")


def resized_size(height: int, width: int, config) -> tuple[int, int]:
    """(height, width) the processor resizes an image of (height, width) to (HF's
    smart_resize; a ValueError beyond 200:1, as HF's)."""
    cfg = as_qwen2_vl_config(config)
    if not cfg.do_resize:
        return height, width
    return smart_resize(int(height), int(width), cfg.factor, cfg.min_pixels, cfg.max_pixels)


def grid_for_size(height: int, width: int, config) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of an image of (height, width), upright RGB."""
    cfg = as_qwen2_vl_config(config)
    rh, rw = resized_size(height, width, cfg)
    return 1, rh // cfg.patch_size, rw // cfg.patch_size


def merged_tokens(height: int, width: int, config) -> int:
    """Image tokens an image of (height, width) fills in the prompt: grid_h * grid_w /
    merge_size**2."""
    cfg = as_qwen2_vl_config(config)
    _, gh, gw = grid_for_size(height, width, cfg)
    return gh * gw // cfg.merge_size ** 2


def _upright_rgb(image, cfg: Qwen2VLImageConfig) -> np.ndarray:
    image = image_lib.to_pil(image)
    if cfg.exif_transpose:
        image = image_lib.apply_exif_orientation(image)
    if cfg.do_convert_rgb:
        image = image_lib.to_rgb(image)
    elif image.mode != "RGB":
        raise ValueError(f"do_convert_rgb=False needs an RGB image, got mode {image.mode}")
    return np.asarray(image)


def patchify(x: np.ndarray, cfg: Qwen2VLImageConfig) -> np.ndarray:
    """[H, W, C] float32 (sides multiples of patch_size * merge_size) -> HF's flattened
    patches [H/P * W/P, C * T * P * P]: merge window by merge window (row-major), the patches
    of a window row-major, each patch channel, frame, row, column; the image repeated to T
    frames."""
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    h, w, c = x.shape
    if h % (p * m) or w % (p * m):
        raise ValueError(f"image of {h}x{w} does not divide into merge windows of "
                         f"{p * m} pixels (patch_size {p} * merge_size {m})")
    gh, gw = h // p, w // p
    x = x.reshape(gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, mh, mw, C, ph, pw)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
    return np.ascontiguousarray(x, dtype=np.float32).reshape(gh * gw, c * t * p * p)


def preprocess(image, config) -> tuple[np.ndarray, np.ndarray]:
    """One image (PIL image, path, in-memory file or uint8 array) -> (patches [grid_h * grid_w,
    C * T * P * P] float32, grid [3] int64 (1, grid_h, grid_w))."""
    cfg = as_qwen2_vl_config(config)
    x = _upright_rgb(image, cfg)
    if cfg.do_resize:
        h, w = resized_size(x.shape[0], x.shape[1], cfg)
        x = image_lib.resize_array(x, h, w, cfg.resample)
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    patches = patchify(x, cfg)
    grid = np.asarray([1, x.shape[0] // cfg.patch_size, x.shape[1] // cfg.patch_size],
                      np.int64)
    return patches, grid


def preprocess_batch(images, config) -> dict:
    """Several images -> {"pixel_values": [sum of patches, C * T * P * P] float32,
    "image_grid_thw": [n_images, 3] int64}, HF's processor's output."""
    cfg = as_qwen2_vl_config(config)
    out = [preprocess(image, cfg) for image in images]
    dim = 3 * cfg.temporal_patch_size * cfg.patch_size ** 2
    if not out:
        return {"pixel_values": np.zeros((0, dim), np.float32),
                "image_grid_thw": np.zeros((0, 3), np.int64)}
    return {"pixel_values": np.concatenate([p for p, _ in out]),
            "image_grid_thw": np.stack([g for _, g in out])}


def image_size(image, config) -> tuple[int, int]:
    """(height, width) of an image as `preprocess` sees it (upright when `exif_transpose`);
    a path or in-memory file is read from its header."""
    cfg = as_qwen2_vl_config(config)
    if isinstance(image, (str, os.PathLike)) or image_lib.is_in_memory(image):
        return image_lib.read_image_size(image, exif_transpose=cfg.exif_transpose)
    image = image_lib.to_pil(image)
    if cfg.exif_transpose:
        image = image_lib.apply_exif_orientation(image)
    return image.height, image.width
