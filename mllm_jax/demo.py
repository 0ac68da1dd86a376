"""The smoke run behind `mllm-jax demo`: a random-initialized `tiny-llava` on the bundled
image, end to end (preprocess, expand image tokens, vision tower, projector, LLM)."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import presets
from mllm_jax.convert.hf_io import abstract_params
from mllm_jax.data.image import preprocess_image
from mllm_jax.data.tokens import expand_image_tokens
from mllm_jax.models import build_model

IMAGE_PATH = os.path.join(os.path.dirname(__file__), "assets", "demo.png")
PROMPT = "What shapes are in the picture?"


def prompt_ids(cfg, prompt=PROMPT):
    """BOS, one image placeholder, then the prompt's bytes as ids. The tiny preset has a
    256-entry vocabulary and no tokenizer; bytes stand in for tokens."""
    text = [b for b in prompt.encode() if b not in (cfg.image_token_index, cfg.text.bos_token_id)]
    return [cfg.text.bos_token_id, cfg.image_token_index] + text


def random_params(model, seed=0):
    """N(0, 0.02) weights, unit norm scales, zero biases, drawn with numpy from the abstract
    parameter tree: `model.init` run eagerly compiles every initializer op by op, which takes
    longer than the whole demo should."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(abstract_params(model))
    out = {}
    for path, leaf in flat.items():
        if path[-1] == "scale":
            out[path] = np.ones(leaf.shape, leaf.dtype)
        elif path[-1] == "bias":
            out[path] = np.zeros(leaf.shape, leaf.dtype)
        else:
            out[path] = (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return flax.traverse_util.unflatten_dict(out)


def run(workdir=None, seed=0):
    """Returns a dict of the arrays involved (numpy) and, with a workdir, what was written."""
    cfg = presets.get("tiny-llava")
    model = build_model(cfg)
    size = cfg.vision.image_size
    pixel_values = preprocess_image(IMAGE_PATH, size)[None]
    ids = expand_image_tokens(prompt_ids(cfg), cfg.image_token_index, cfg.image_seq_length)
    input_ids = np.asarray([ids], np.int32)
    params = random_params(model, seed)

    @jax.jit
    def forward(params, input_ids, pixel_values):
        variables = {"params": params}
        feats = model.apply(variables, pixel_values, method=model.image_features)
        return feats, model.apply(variables, input_ids, pixel_values)

    feats, logits = forward(params, jnp.asarray(input_ids), jnp.asarray(pixel_values))
    out = dict(image_path=IMAGE_PATH, pixel_values=pixel_values, input_ids=input_ids,
               image_features=np.asarray(feats), logits=np.asarray(logits),
               image_token_index=cfg.image_token_index,
               num_image_tokens=int(np.sum(input_ids == cfg.image_token_index)))
    if workdir is not None:
        from mllm_jax.convert.orbax_io import save_orbax
        os.makedirs(workdir, exist_ok=True)
        arrays = os.path.join(workdir, "demo_outputs.npz")
        np.savez(arrays, pixel_values=pixel_values, input_ids=input_ids, logits=out["logits"])
        ckpt = save_orbax(model, params, os.path.join(workdir, "checkpoint"), overwrite=True)
        out["written"] = {"inputs and logits": arrays, "orbax checkpoint": ckpt}
    return out
