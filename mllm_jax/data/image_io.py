"""Reading images: files, object-store paths and in-memory image files to PIL images,
every failure naming the image (`ImageReadError`, `ImageRejected`); EXIF orientation and
HF's conversion to RGB. `data.image` preprocesses what these read, and re-exports them.

An image is a path (local, or an object-store URL: `storage`), or an in-memory image file:
an object with `.path` (its name, for messages) and `.data` (the file's bytes), e.g.
`tfds_builders.ImageBytes`, decoded exactly as the file would be. An image with more pixels
than PIL's `Image.MAX_IMAGE_PIXELS` (a possible decompression bomb) is refused before it is
decoded: `ImageRejected` with reason IMAGE_TOO_LARGE.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mllm_jax import storage

# Reasons an image is refused (ImageRejected.reason): `data.image` refuses by aspect ratio.
IMAGE_ASPECT_RATIO = "image_aspect_ratio"
IMAGE_TOO_LARGE = "image_too_large"


class ImageReadError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


class ImageRejected(ImageReadError, ValueError):
    """An image refused before it is processed: `reason` is IMAGE_TOO_LARGE or
    IMAGE_ASPECT_RATIO; the message names the image and what to do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def is_in_memory(image) -> bool:
    """Whether `image` is an in-memory image file: an object with `.path` (its name, for
    messages) and `.data` (the file's bytes), e.g. `tfds_builders.ImageBytes`."""
    return hasattr(image, "data") and hasattr(image, "path") and not isinstance(image, Path)


def image_name(image) -> str:
    """The name a message gives an image: a path, or an in-memory image's `.path`."""
    if is_in_memory(image):
        return str(image.path)
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else repr(image)


# Image.open's decompression-bomb warning is made an error while a header is read;
# warnings.catch_warnings is process-wide, so those reads take turns.
_OPEN_LOCK = threading.Lock()


def _open(source, name: str) -> Image.Image:
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ImageRejected(IMAGE_TOO_LARGE, _too_large(name, e)) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:  # a PIL too old to check it on open
        image.close()
        raise ImageRejected(IMAGE_TOO_LARGE, _too_large(
            name, f"{image.width}x{image.height} = {image.width * image.height} pixels"))
    return image


def _too_large(name, what) -> str:
    return (f"cannot read image {name!r}: {what}; refused as a possible decompression bomb "
            f"(more than PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels): "
            f"downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine")


def read_image(path) -> Image.Image:
    """Open and fully decode an image file (lazy PIL errors surface here, naming the file).
    `path` is a path, or an in-memory image file (an object with `.path` and `.data`, the
    file's bytes; see `is_in_memory`), decoded exactly as the file would be. An image with
    more pixels than PIL.Image.MAX_IMAGE_PIXELS is refused before decoding
    (`ImageRejected`, reason IMAGE_TOO_LARGE)."""
    name, source = _source(path)
    try:
        with _open(source, name) as image:
            image.load()
    except ImageRejected:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {name!r}: {e}") from e
    return image


# EXIF orientations that turn the image a quarter (exif_transpose swaps its sides).
_QUARTER_TURNS = (5, 6, 7, 8)


def read_image_size(path, *, exif_transpose: bool = True) -> tuple[int, int]:
    """(height, width) of an image file as `preprocess` sees it: upright by its EXIF
    orientation when `exif_transpose`. Read from the header where the format allows (a
    PNG is decoded when its EXIF is not before its pixels: PIL looks for it there), with
    `read_image`'s refusals and errors naming the file. `path` may also be a PIL image."""
    if isinstance(path, Image.Image):
        turned = exif_transpose and path.getexif().get(0x0112) in _QUARTER_TURNS
        return (path.width, path.height) if turned else (path.height, path.width)
    name, source = _source(path)
    try:
        with _open(source, name) as image:
            width, height = image.size
            turned = exif_transpose and image.getexif().get(0x0112) in _QUARTER_TURNS
    except ImageRejected:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {name!r}: {e}") from e
    return (width, height) if turned else (height, width)


def _source(path):
    """(name for messages, what PIL opens) of a path or an in-memory image file."""
    if is_in_memory(path):
        name, data = image_name(path), path.data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageReadError(f"cannot read image {name!r}: data is a "
                                 f"{type(data).__name__}, not bytes")
        source = io.BytesIO(bytes(data))
    elif storage.is_remote(path):
        # Read whole (one request; an image is small) and decoded from memory: object-store
        # files seek by new requests, and PIL seeks while it reads a header.
        name = os.fspath(path)
        try:
            source = io.BytesIO(storage.as_path(path).read_bytes())
        except Exception as e:  # noqa: BLE001  any store error is an unreadable image
            # gcsfs raises FileNotFoundError, TensorFlow's gfile its own NotFoundError.
            cause = FileNotFoundError(str(e)) if type(e).__name__ == "NotFoundError" else e
            raise ImageReadError(f"cannot read image {name!r}: {e}") from cause
    else:
        name, source = os.fspath(path), path
    return name, source


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Make the image upright according to its EXIF orientation tag (PIL's exif_transpose).

    HF's image processors leave PIL inputs as they are; HF's `load_image` (used for paths and
    URLs) applies this, as do browsers and photo viewers, so we apply it by default.
    """
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB exactly as transformers' convert_to_rgb: alpha ("A" band, e.g. RGBA, LA,
    PA) or a transparency key (P/L/RGB with info["transparency"]) is composited onto opaque white;
    everything else (L, 1, P, CMYK, YCbCr, I;16, I, F, ...) is PIL convert("RGB"), which clips
    16-bit/32-bit/float values to 0..255 rather than rescaling them.

    (transformers' `load_image`, used when a processor is given a path, instead drops the alpha
    channel; we composite for every input so a file and its decoded image agree.)
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pil(image) -> Image.Image:
    """A PIL image of `image`: a PIL image as is, a path or in-memory file read
    (`read_image`, not EXIF-oriented), an array converted."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)) or is_in_memory(image):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 [H, W] or [H, W, C], got {image.dtype}")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    raise TypeError(f"expected a PIL image, a path or a uint8 array, got {type(image).__name__}")
