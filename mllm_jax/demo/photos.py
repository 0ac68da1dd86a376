"""Out-of-world images: the final model describes a few real photographs (those bundled
with scikit-image or scikit-learn, `shapes.out_of_world_images`). A model that has only
seen coloured shapes on grey describes photos in the world's words; the report shows what
it says."""
from __future__ import annotations

import os

from PIL import Image

from mllm_jax.demo import shapes
from mllm_jax.demo.evaluate import TEMPLATE, image_config
from mllm_jax.infer.batching import Conversation, generate_all

SIZE = 128  # px of the saved photos (the model's preprocessing resizes them)


def describe(model, params, tokenizer, out_dir, *, max_new_tokens=96) -> list:
    """[(name, png path, detailed description)]: each photo saved under `out_dir` and
    described greedily; empty when neither library is installed."""
    photos = shapes.out_of_world_images(SIZE)
    if not photos:
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, pixels in photos:
        paths.append(os.path.join(out_dir, f"{name}.png"))
        Image.fromarray(pixels).save(paths[-1])
    convs = [Conversation([{"from": "human", "value": "<image>\n" + shapes.DETAIL_PROMPT}],
                          [path], name) for (name, _), path in zip(photos, paths)]
    answers = generate_all(model, params, tokenizer, image_config(model.cfg), convs, TEMPLATE,
                           batch_size=len(convs), pad_to_multiple=16,
                           max_new_tokens=max_new_tokens)
    return [(name, path, answer) for (name, _), path, answer in zip(photos, paths, answers)]
