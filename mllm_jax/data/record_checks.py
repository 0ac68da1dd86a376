"""A LLaVA-format record's checks before it becomes an example: its images read and
preprocessed, its conversation's structure, a preference pair's turns. Each returns `Bad`
(a REASONS name and what was found) instead of raising, so `data.pipeline` counts and lists
the record and goes on; the names are importable from `data.pipeline` too.
"""
from __future__ import annotations

import os
from typing import NamedTuple

from mllm_jax import storage
from mllm_jax.data import image as image_lib
from mllm_jax.data import templates as T
from mllm_jax.data.llava_json import RefusedImage
from mllm_jax.data.paths import OUTSIDE_ROOT

# Reasons a record is skipped (REASONS adds templates.PROMPT_TOO_LONG / IMAGE_DOES_NOT_FIT).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
MALFORMED_CONVERSATION = "malformed_conversation"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
TOO_MANY_IMAGES = "too_many_images"
EMPTY_TEXT = "empty_text"
TOKENIZATION_MISMATCH = "tokenization_mismatch"
TEXT_NOT_ENCODABLE = "text_not_encodable"  # e.g. a lone surrogate ("\ud800", valid JSON)
IMAGE_ASPECT_RATIO = image_lib.IMAGE_ASPECT_RATIO  # beyond the config's max_aspect_ratio
IMAGE_TOO_LARGE = image_lib.IMAGE_TOO_LARGE  # more pixels than PIL's MAX_IMAGE_PIXELS
REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE, MALFORMED_CONVERSATION, IMAGE_COUNT_MISMATCH,
           TOO_MANY_IMAGES, EMPTY_TEXT, TOKENIZATION_MISMATCH, TEXT_NOT_ENCODABLE,
           OUTSIDE_ROOT, IMAGE_ASPECT_RATIO, IMAGE_TOO_LARGE, T.PROMPT_TOO_LONG,
           T.IMAGE_DOES_NOT_FIT)


class Bad(NamedTuple):
    """Why a record (or one of its images) is skipped: a REASONS name and the details."""

    reason: str
    detail: str


def fixed_image_shape(cfg: image_lib.ImageProcessorConfig) -> tuple:
    """(height, width, 3) of the one view per image a processor config gives."""
    if cfg.mode == "anyres":
        raise ValueError("the image processor config's mode is 'anyres' (tiles of the image), "
                         "but this model takes one fixed-size view per image; train a model "
                         "that reads anyres views (LLaVA-NeXT), or give data.processor a "
                         "'crop' or 'pad' preprocessor_config.json")
    if cfg.do_center_crop:
        return cfg.crop_size["height"], cfg.crop_size["width"], 3
    if cfg.do_resize and "height" in cfg.size:
        return cfg.size["height"], cfg.size["width"], 3
    raise ValueError("fixed batch shapes need do_center_crop or a (height, width) size")


def decode_images(paths, cfg, image_inputs=None) -> list:
    """Each image -> float32 pixels (`image_inputs.encode`'s encoding when given), or a
    `Bad` saying why it cannot be read. An image is a
    path, or an in-memory image file: an object with `.path` (named in messages) and `.data`
    (the file's bytes), e.g. `tfds_builders.ImageBytes`, decoded as the file would be."""
    out = []
    for path in paths:
        if isinstance(path, RefusedImage):  # e.g. outside the image root
            out.append(Bad(path.reason, path.detail))
            continue
        if image_lib.is_in_memory(path):
            name = image_lib.image_name(path)
        elif not isinstance(path, (str, os.PathLike)):
            out.append(Bad(UNREADABLE_IMAGE, f"image entry is not a path: {path!r}"))
            continue
        elif not storage.is_remote(path) and not os.path.exists(path):
            # (remote: no existence request per image; the read says MISSING_IMAGE)
            out.append(Bad(MISSING_IMAGE, f"no such file {os.fspath(path)!r}"))
            continue
        else:
            name = os.fspath(path)
        try:
            image = image_lib.read_image(path)
            out.append(image_lib.preprocess(image, cfg) if image_inputs is None
                       else image_inputs.encode(image))
        except image_lib.ImageRejected as e:  # too large, or too elongated
            detail = str(e) if name in str(e) else f"image {name!r}: {e}"
            out.append(Bad(e.reason, detail))
        except image_lib.ImageReadError as e:
            missing = isinstance(e.__cause__, FileNotFoundError)
            out.append(Bad(MISSING_IMAGE if missing else UNREADABLE_IMAGE,
                           f"no such file {name!r}" if missing and storage.is_remote(name)
                           else str(e)))  # (the words a local missing file gets above)
        except (OSError, ValueError, TypeError) as e:  # decodes, but preprocessing fails
            out.append(Bad(UNREADABLE_IMAGE, f"cannot preprocess {name!r}: {e}"))
    return out


def check_conversation(conversations, num_images, sample_id):
    """Structural checks before templating: a `Bad` or None."""
    if not isinstance(conversations, list):
        return Bad(MALFORMED_CONVERSATION, f"'conversations' is not a list: "
                                           f"{type(conversations).__name__}")
    if not conversations:
        return Bad(EMPTY_TEXT, "no messages")
    try:
        _, turns = T.parse_conversation(conversations, sample_id)
    except T.MalformedConversation as e:
        return Bad(MALFORMED_CONVERSATION, str(e))
    for k, message in enumerate(conversations):
        try:
            message["value"].encode("utf-8")
        except UnicodeEncodeError as e:
            return Bad(TEXT_NOT_ENCODABLE, f"message {k} ({message['from']}): "
                                           f"{e.object[e.start:e.end]!r} at position {e.start} "
                                           f"cannot be encoded as UTF-8 ({e.reason})")
    placeholders = sum(t.user.count(T.IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != num_images:
        return Bad(IMAGE_COUNT_MISMATCH, f"{placeholders} {T.IMAGE_PLACEHOLDER} placeholders, "
                                         f"{num_images} images")
    for k, t in enumerate(turns):
        if t.assistant is not None and not t.assistant:
            return Bad(EMPTY_TEXT, f"assistant message of turn {k} is empty")
        if not t.user.replace(T.IMAGE_PLACEHOLDER, "").strip() and not num_images:
            return Bad(EMPTY_TEXT, f"user message of turn {k} is empty")
    return None


def preference_conversations(record):
    """(chosen, rejected) conversations of a preference record {prompt, chosen, rejected}:
    the prompt is the user turn, each answer the assistant turn. A `Bad` if malformed."""
    fields = {k: getattr(record, k, None) for k in ("prompt", "chosen", "rejected")}
    wrong = [k for k, v in fields.items() if not isinstance(v, str)]
    if wrong:
        return Bad(MALFORMED_CONVERSATION, f"not a preference pair: {', '.join(wrong)} "
                                           f"missing or not a string")
    user = {"from": "human", "value": fields["prompt"]}
    return tuple([user, {"from": "gpt", "value": fields[k]}] for k in ("chosen", "rejected"))
