"""Answers for many conversations at once: each conversation is tokenized with its template,
the prompts are left padded into batches, their images stacked in prompt order, and
`generate` runs once per batch.

A conversation's last message is the user's; its "<image>" placeholders (any number, in
any turn) take the conversation's images in order, so a multimodal few-shot prompt is one
user message "<image>\\nQ1\\nA1\\n\\n<image>\\nQ2\\nA2\\n\\n<image>\\nQ" with three images.

Images become model inputs as the model family says (`registry.image_inputs`): a fixed
token count and one [H, W, 3] array each (LLaVA-1.5, BLIP-2), or a count that depends on
the image's size (LLaVA-NeXT's anyres views and `image_sizes`). For the latter, prompts are
tokenized from the images' sizes, read from the files' headers, before any image is
decoded; pixels are decoded one batch at a time.

Padded lengths are rounded up to a multiple of `pad_to_multiple` and short batches are
filled up to `batch_rows` rows (copies of their last row, answers discarded), so a run
compiles one program per length bucket instead of one per batch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import numpy as np

from mllm_jax import jsonfile
from mllm_jax.data import image as image_lib
from mllm_jax.data.image_inputs import FixedImages
from mllm_jax.data.templates import IMAGE_PLACEHOLDER, build_prompt, write_images
from mllm_jax.infer.generate import check_prompts, generate
from mllm_jax.models import registry


def image_config_for(model, checkpoint_dir):
    """The family's own reading of the checkpoint's image processor config
    (`registry.image_config`), else the checkpoint's preprocessor_config.json, else CLIP
    preprocessing at the model's resolution, after padding to a square when config.json's
    `image_aspect_ratio` is "pad" (LLaVA-repository checkpoints, whose processor is their
    tower's, in another directory)."""
    own = registry.image_config(model.cfg, checkpoint_dir)
    if own is not None:  # the family reads its processor's config itself (Qwen2-VL)
        return own
    if os.path.exists(os.path.join(checkpoint_dir, "preprocessor_config.json")):
        return image_lib.load_image_processor_config(checkpoint_dir)
    size = model.cfg.vision.image_size
    config_json = os.path.join(checkpoint_dir, "config.json")
    aspect = (jsonfile.read_object(config_json, "restore the checkpoint's config.json")
              .get("image_aspect_ratio") if os.path.exists(config_json) else None)
    return image_lib.ImageProcessorConfig(mode="pad" if aspect == "pad" else "crop",
                                          size={"shortest_edge": size}, crop_size=size)


@dataclasses.dataclass
class Conversation:
    """LLaVA-format messages ending with a user message, and the images its "<image>"
    placeholders stand for, in order (paths, image-file bytes or in-memory images)."""
    messages: list
    images: list = dataclasses.field(default_factory=list)
    sample_id: object = None


class _ImageBytes(NamedTuple):
    path: str  # a name for messages
    data: bytes


class ImageLoadError(ValueError):
    """An image of a conversation that cannot be read; names the sample and the file."""


def image_label(image) -> str:
    """A short name of an image for messages and logs (the path, or what it is)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes of image data>"
    if image_lib.is_in_memory(image):
        return image_lib.image_name(image)
    return str(image)


def read_image(image):
    """A decoded PIL image from a path, an in-memory image or the bytes of an image file."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = _ImageBytes(image_label(image), bytes(image))
    return image_lib.read_image(image)


def read_image_size(image, exif_transpose: bool = True) -> tuple:
    """(height, width) of an image as preprocessing sees it (upright by its EXIF orientation
    when `exif_transpose`), from its header where the format allows."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = _ImageBytes(image_label(image), bytes(image))
    return image_lib.read_image_size(image, exif_transpose=exif_transpose)


def image_inputs_for(model, image_cfg=None):
    """The model family's image inputs (`registry.image_inputs`) with this image config."""
    return registry.image_inputs(model.cfg, image_cfg) if registry.is_multimodal(model.cfg) \
        else None


def image_token_counts(model, conversation: Conversation, image_inputs=None):
    """Image tokens of each of the conversation's images, or one count for all of them when
    the family's count does not depend on the image (an ImageLoadError naming the sample
    when an image's size cannot be read)."""
    image_inputs = image_inputs or image_inputs_for(model)
    if not image_inputs.sized:
        return image_inputs.tokens(None)
    exif = getattr(getattr(image_inputs, "image_cfg", None), "exif_transpose", True)
    counts = []
    for image in conversation.images:
        try:
            counts.append(image_inputs.tokens(read_image_size(image, exif)))
        except (OSError, ValueError) as e:
            raise ImageLoadError(f"sample {conversation.sample_id!r}: cannot read image "
                                 f"{image_label(image)}: {e}") from e
    return counts


def prompt_encoder_for(model, checkpoint_dir):
    """The model family's own prompt encoder (`ModelFamily.prompt_encoder`: models whose HF
    processor builds the inputs), or None: the conversation templates."""
    make = registry.family(model.cfg).prompt_encoder
    return None if make is None else make(model.cfg, checkpoint_dir)


class TemplatePrompts:
    """The prompt encoder of a template-prompted model that also reads per-sample inputs
    (`registry.sample_inputs`: an instruction-aware Q-Former connector's instruction): the
    template's prompt ids, and the inputs built from the conversation's messages as in
    training."""

    def __init__(self, model, tokenizer, template, builder, system=None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.builder, self.system = builder, system

    def encode(self, conversation):
        ids = encode_prompt(self.model, self.tokenizer, conversation, self.template,
                            system=self.system)
        return ids, self.builder.encode(conversation.messages, conversation.sample_id)

    def batch(self, extras) -> dict:
        return self.builder.collate(extras, len(extras))


def template_prompt_encoder(model, tokenizer, template, system=None, prompt_encoder=None):
    """`prompt_encoder` when given; else a `TemplatePrompts` when the model reads per-sample
    inputs (built with the tokenizer's own directory, as training builds them from
    data.tokenizer), else None (the template alone)."""
    if prompt_encoder is not None or not registry.sample_input_keys(model.cfg):
        return prompt_encoder
    builder = registry.sample_inputs(model.cfg, {"tokenizer": tokenizer.source})
    return TemplatePrompts(model, tokenizer, template, builder, system)


def encode_prompts(model, tokenizer, conversations, template, *, system=None,
                   prompt_encoder=None, image_inputs=None):
    """(prompt ids, extras): `encode_prompt` of each conversation, or the family's
    `prompt_encoder` (whose extras, e.g. InstructBLIP's Q-Former tokens, become model
    inputs in `generate_encoded`; None without one)."""
    if prompt_encoder is None:
        return ([encode_prompt(model, tokenizer, c, template, system=system,
                               image_inputs=image_inputs)
                 for c in conversations], None)
    encoded = [prompt_encoder.encode(c) for c in conversations]
    return [ids for ids, _ in encoded], [extra for _, extra in encoded]


def encode_prompt(model, tokenizer, conversation: Conversation, template, *,
                  system=None, image_inputs=None) -> np.ndarray:
    """int32 prompt ids (image placeholders expanded to the model's image tokens, written as
    the model's checkpoint layout writes an image, `registry.image_text`). `image_inputs`
    (`image_inputs_for`; default: the family's with its default image config) counts each
    image's tokens; a family whose count depends on the image's size reads the sizes from
    the images' headers."""
    count = sum(m["value"].count(IMAGE_PLACEHOLDER) for m in conversation.messages)
    if count != len(conversation.images):
        raise ValueError(f"sample {conversation.sample_id!r}: {count} {IMAGE_PLACEHOLDER} "
                         f"placeholders but {len(conversation.images)} images")
    multimodal = registry.is_multimodal(model.cfg)
    if count and not multimodal:
        raise ValueError(f"sample {conversation.sample_id!r} has images, but the checkpoint "
                         f"has no vision tower")
    written = registry.image_text(model.cfg, IMAGE_PLACEHOLDER) if count else IMAGE_PLACEHOLDER
    messages, placement = write_images(conversation.messages, template, written)
    return build_prompt(messages, template, tokenizer, image_placement=placement,
                        image_tokens_per_image=(image_token_counts(model, conversation,
                                                                   image_inputs)
                                                if multimodal else 0),
                        image_token_id=registry.image_token_id(model.cfg),
                        system=system, sample_id=conversation.sample_id)


def check_encoded(model, conversations, prompts):
    """`check_prompts` on each encoded prompt before any image is read or anything runs; a
    ValueError names the conversation's sample id."""
    for conversation, prompt in zip(conversations, prompts):
        try:
            check_prompts(model, prompt)
        except ValueError as e:
            if conversation.sample_id is None:
                raise
            raise ValueError(f"sample {conversation.sample_id!r}: {e}") from e


def load_pixels(conversation: Conversation, image_cfg, image_inputs=None) -> list:
    """The conversation's images encoded by `image_inputs.encode`, in order; default
    (`FixedImages`): preprocessed [H, W, 3] float32 arrays."""
    if image_inputs is None:
        image_inputs = FixedImages(None, image_cfg) if image_cfg is not None else None
    out = []
    for image in conversation.images:
        try:
            out.append(image_inputs.encode(read_image(image)))
        except (OSError, ValueError) as e:
            raise ImageLoadError(f"sample {conversation.sample_id!r}: cannot read image "
                                 f"{image_label(image)}: {e}") from e
    return out


def left_pad(sequences, pad_id: int, multiple: int = 1):
    """([b, L] ids, [b, L] attention mask), each sequence right-aligned; L is the longest
    length rounded up to `multiple`."""
    longest = max(len(s) for s in sequences)
    length = -(-longest // multiple) * multiple
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1
    return ids, mask


def decode_answer(tokenizer, new_ids, stop_strings=()) -> str:
    """Text of generated ids: cut at the first EOS, ids past the tokenizer's vocabulary
    (padded embedding rows) dropped, special tokens skipped, cut before the first stop
    string (as LLaVA's evaluation strips its stop string), stripped."""
    out = [int(t) for t in new_ids]
    if tokenizer.eos_id in out:
        out = out[:out.index(tokenizer.eos_id)]
    out = [t for t in out if t < tokenizer.vocab_size]
    text = tokenizer.decode(out, skip_special=True)
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text.strip()


def stop_sequences(tokenizer, stop_strings) -> list:
    """Token ids of each stop string as tokenized on its own, for `generate` to stop on.
    In context a string may tokenize differently; the text is cut at it regardless
    (`decode_answer`), generation then just runs on to EOS or max_new_tokens."""
    out = []
    for stop in stop_strings:
        if not stop:
            raise ValueError("stop strings must not be empty")
        ids = [t for t in tokenizer.encode(stop) if t != tokenizer.bos_id]
        if ids:
            out.append(ids)
    return out


def generate_encoded(model, params, tokenizer, prompts, pixels, *, pad_to_multiple=32,
                     batch_rows=None, stop_strings=(), extras=None, prompt_encoder=None,
                     image_inputs=None, **gen) -> list[str]:
    """Answers for already encoded prompts (list of id arrays) and their encoded images (one
    list per prompt, as `load_pixels` gives them; batched into model inputs by
    `image_inputs.batch`, default the family's). `gen` goes to `generate` as keywords;
    `stop_strings` end an answer like EOS and are cut from it. `extras`: the prompts'
    extras from `prompt_encoder.encode`, batched by `prompt_encoder.batch` into model
    inputs."""
    if not prompts:
        return []
    n = len(prompts)
    if batch_rows is not None and n < batch_rows:
        prompts = list(prompts) + [prompts[-1]] * (batch_rows - n)
        pixels = list(pixels) + [pixels[-1]] * (batch_rows - n)
        if extras is not None:
            extras = list(extras) + [extras[-1]] * (batch_rows - n)
    if extras is not None:
        gen.update(prompt_encoder.batch(extras))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids, mask = left_pad(prompts, pad, pad_to_multiple)
    flat = [p for per_prompt in pixels for p in per_prompt]
    if flat:
        gen.update((image_inputs or image_inputs_for(model)).batch(flat))
    pixel_values = gen.pop("pixel_values", None)
    gen.setdefault("eos_token_id", tokenizer.eos_id)
    if stop_strings:
        gen["stop_sequences"] = stop_sequences(tokenizer, stop_strings)
    out = generate(model, params, ids, attention_mask=mask, pixel_values=pixel_values, **gen)
    return [decode_answer(tokenizer, row, stop_strings) for row in out[:n]]


def generate_batch(model, params, tokenizer, image_cfg, conversations, template="vicuna_v1",
                   *, system=None, pad_to_multiple=32, batch_rows=None, prompt_encoder=None,
                   **gen) -> list[str]:
    """One answer per conversation, generated together in one left-padded batch.

    `gen` are `generate`'s keywords (max_new_tokens, do_sample, temperature, num_beams,
    ...); eos_token_id defaults to the tokenizer's EOS. `prompt_encoder`
    (`prompt_encoder_for`) replaces the template when the model family has one."""
    prompt_encoder = template_prompt_encoder(model, tokenizer, template, system, prompt_encoder)
    image_inputs = image_inputs_for(model, image_cfg)
    prompts, extras = encode_prompts(model, tokenizer, conversations, template, system=system,
                                     prompt_encoder=prompt_encoder, image_inputs=image_inputs)
    check_encoded(model, conversations, prompts)
    pixels = [load_pixels(c, image_cfg, image_inputs) for c in conversations]
    return generate_encoded(model, params, tokenizer, prompts, pixels,
                            pad_to_multiple=pad_to_multiple, batch_rows=batch_rows,
                            extras=extras, prompt_encoder=prompt_encoder,
                            image_inputs=image_inputs, **gen)


def generate_all(model, params, tokenizer, image_cfg, conversations, template="vicuna_v1",
                 *, batch_size=8, system=None, pad_to_multiple=32, progress=None, rng=None,
                 prompt_encoder=None, **gen) -> list[str]:
    """Answers for any number of conversations, in their order. Prompts are batched
    longest first (similar lengths share a batch, less padding); images are read one batch
    at a time. `progress(n)` is called after each batch with its size. With sampling, batch
    k draws from `fold_in(rng, k)`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_encoder = template_prompt_encoder(model, tokenizer, template, system, prompt_encoder)
    image_inputs = image_inputs_for(model, image_cfg)
    prompts, extras = encode_prompts(model, tokenizer, conversations, template, system=system,
                                     prompt_encoder=prompt_encoder, image_inputs=image_inputs)
    check_encoded(model, conversations, prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    answers = [None] * len(prompts)
    for k, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        extra = {} if rng is None else {"rng": jax.random.fold_in(rng, k)}
        out = generate_encoded(model, params, tokenizer, [prompts[i] for i in chunk],
                               [load_pixels(conversations[i], image_cfg, image_inputs)
                                for i in chunk],
                               pad_to_multiple=pad_to_multiple, image_inputs=image_inputs,
                               batch_rows=batch_size if len(order) > batch_size else None,
                               extras=None if extras is None else [extras[i] for i in chunk],
                               prompt_encoder=prompt_encoder, **extra, **gen)
        for i, answer in zip(chunk, out):
            answers[i] = answer
        if progress is not None:
            progress(len(chunk))
    return answers
