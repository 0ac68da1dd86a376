"""Image preprocessing as HF's CLIPImageProcessor does it, producing NHWC float32.

Resize the shortest side to `size` (PIL bicubic), center-crop to `size` x `size`, scale to
[0, 1], normalize with the CLIP mean and std.
"""
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_image(image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """A PIL image (or a path to one) -> float32 [size, size, 3]."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    w, h = image.size
    # The long side is truncated, not rounded, as in HF's get_resize_output_image_size.
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
