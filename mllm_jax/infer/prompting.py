"""From a checkpoint directory, images and a question to generated text: the tokenizer,
image processor and template of the checkpoint, then `generate`."""
import os

import numpy as np

from mllm_jax.data import image as image_lib
from mllm_jax.data.templates import build_prompt
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer.generate import generate


def image_config_for(model, checkpoint_dir):
    """The checkpoint's preprocessor_config.json, else CLIP preprocessing at the model's
    resolution."""
    if os.path.exists(os.path.join(checkpoint_dir, "preprocessor_config.json")):
        return image_lib.load_image_processor_config(checkpoint_dir)
    size = model.cfg.vision.image_size
    return image_lib.ImageProcessorConfig(mode="crop", size={"shortest_edge": size},
                                          crop_size=size)


def tokens_per_image(cfg) -> int:
    grid = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    return grid + (1 if cfg.vision_feature_select_strategy == "full" else 0)


class Session:
    """A conversation with a loaded model: `ask(text, images=())` returns the answer and
    keeps the turns (and images) for the next question."""

    def __init__(self, model, params, checkpoint_dir, template="vicuna_v1", *,
                 max_new_tokens=128, system=None, **sampling):
        self.model, self.params = model, params
        self.tokenizer = load_tokenizer(checkpoint_dir)
        self.template, self.system = template, system
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.multimodal = model.cfg.model_type == "llava"
        self.image_cfg = image_config_for(model, checkpoint_dir) if self.multimodal else None
        self.turns, self.pixels = [], []

    def ask(self, text, images=()):
        if images and not self.multimodal:
            raise ValueError("this checkpoint has no vision tower; it takes no images")
        value = "<image>\n" * len(images) + text
        self.pixels += [image_lib.preprocess(image_lib.read_image(p), self.image_cfg)
                        for p in images]
        conversation = self.turns + [{"from": "human", "value": value}]
        image_id = self.model.cfg.image_token_index if self.multimodal else None
        ids = build_prompt(conversation, self.template, self.tokenizer,
                           image_tokens_per_image=(tokens_per_image(self.model.cfg)
                                                   if self.multimodal else 0),
                           image_token_id=image_id, system=self.system)
        pixel_values = np.stack(self.pixels) if self.pixels else None
        out = generate(self.model, self.params, ids[None], pixel_values=pixel_values,
                       max_new_tokens=self.max_new_tokens,
                       eos_token_id=self.tokenizer.eos_id, **self.sampling)[0]
        out = [int(t) for t in out]
        if self.tokenizer.eos_id in out:
            out = out[:out.index(self.tokenizer.eos_id)]
        # Checkpoints often pad the embedding rows past the tokenizer's vocabulary (e.g.
        # llava-hf's 32064); such ids have no text, as in HF's decode.
        out = [t for t in out if t < self.tokenizer.vocab_size]
        answer = self.tokenizer.decode(out, skip_special=True).strip()
        self.turns = conversation + [{"from": "gpt", "value": answer}]
        return answer
