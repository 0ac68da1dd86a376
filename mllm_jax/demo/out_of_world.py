"""Images from outside the shapes world: real photographs, to see what a model that has
only seen coloured shapes says about them.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image


def out_of_world_images(size: int = 32) -> list:
    """Real photographs as (name, uint8 [size, size, 3]) pairs, centre-cropped and resized:
    scikit-image's astronaut, coffee and chelsea, or scikit-learn's sample images. Empty
    (with a warning naming the packages) when neither library is installed."""
    photos = []
    try:
        from skimage import data as skdata
        photos = [(n, getattr(skdata, n)()) for n in ("astronaut", "coffee", "chelsea")]
    except ImportError:
        try:
            from sklearn.datasets import load_sample_images
            bunch = load_sample_images()
            photos = [(os.path.splitext(os.path.basename(f))[0], img)
                      for f, img in zip(bunch.filenames, bunch.images)]
        except ImportError:
            warnings.warn("out_of_world_images: no photographs available; install "
                          "scikit-image (or scikit-learn) to get them", stacklevel=2)
            return []
    out = []
    for name, img in photos:
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
        pil = Image.fromarray(np.asarray(crop, np.uint8)).resize((size, size), Image.BICUBIC)
        out.append((name, np.asarray(pil)))
    return out
