"""Examples -> batches of fixed shapes, shared by `LlavaPipeline` and `MixturePipeline`."""
from __future__ import annotations

import numpy as np

from mllm_jax.train.losses import IGNORE_INDEX


def collate(rows, mode, *, batch_size, max_length, max_images, image_shape, pad_id,
            sample_ids=None, sample_inputs=None, image_inputs=None) -> dict:
    """Examples (`LlavaPipeline._example`) -> a batch of fixed shapes (see the module
    docstring; mode "dpo" gives chosen_* and rejected_* for input_ids, attention_mask and
    labels). A row's images come first in pixel_values, zeros after (none: all zeros).
    `sample_inputs` (the model's per-sample inputs builder) collates each row's
    "model_inputs" into its own keys. `image_inputs` (a sized family's, see
    `registry.image_inputs`) lays out the rows' image encodings instead (`collate`)."""
    b, s = batch_size, max_length
    out = {}

    def text(prefix, examples):
        input_ids = np.full((b, s), pad_id, np.int32)
        mask = np.zeros((b, s), np.int32)
        labels = np.full((b, s), IGNORE_INDEX, np.int32)
        for r, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[r, :n] = ex["input_ids"]
            mask[r, :n] = 1
            labels[r, :n] = ex["labels"]
        out.update({f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": mask,
                    f"{prefix}labels": labels})

    if mode == "dpo":
        for side in ("chosen", "rejected"):
            text(f"{side}_", [ex[side] for ex in rows])
    else:
        text("", rows)
    if image_inputs is not None:
        out.update(image_inputs.collate([ex["pixels"] for ex in rows], b, max_images))
    else:
        pixels = np.zeros((b, max_images) + tuple(image_shape), np.float32)
        for r, ex in enumerate(rows):
            for k, p in enumerate(ex["pixels"]):
                pixels[r, k] = p
        out["pixel_values"] = pixels
    if sample_inputs is not None:
        out.update(sample_inputs.collate([ex["model_inputs"] for ex in rows], b))
    if sample_ids is not None:
        out["sample_ids"] = np.asarray([str(i) for i in sample_ids])
    return out
