"""How a prompt's images become model inputs: per image, its token count and its encoding;
per batch, the model's keywords (`registry.image_inputs`, the contract is
`ModelFamily.image_inputs`'s).

`FixedImages` is what LLaVA-1.5, BLIP-2 and the other fixed-resolution models take: every
image one [H, W, 3] array of `tokens_per_image(cfg)` tokens, stacked into `pixel_values`
[n_images, H, W, 3]. A family whose token count depends on the image (LLaVA-NeXT's anyres
views) registers its own.
"""
from __future__ import annotations

import numpy as np

from mllm_jax.data import image as image_lib
from mllm_jax.models import registry


def default_image_config(cfg) -> image_lib.ImageProcessorConfig:
    """CLIP preprocessing (resize the short side, centre crop) at the tower's resolution."""
    size = cfg.vision.image_size
    return image_lib.ImageProcessorConfig(mode="crop", size={"shortest_edge": size},
                                          crop_size=size)


class FixedImages:
    """Images of one fixed shape and token count: `encode` is `data.image.preprocess`."""

    sized = False

    def __init__(self, cfg, image_cfg=None):
        self.cfg = cfg
        self.image_cfg = (default_image_config(cfg) if image_cfg is None
                          else image_lib.as_image_config(image_cfg))

    def tokens(self, size=None) -> int:
        return registry.tokens_per_image(self.cfg)

    def encode(self, image) -> np.ndarray:
        """[H, W, 3] float32."""
        return image_lib.preprocess(image, self.image_cfg)

    def batch(self, encodings) -> dict:
        return {"pixel_values": np.stack(encodings)} if len(encodings) else {}

    def tokens_of(self, encoding) -> int:
        return self.tokens(None)
