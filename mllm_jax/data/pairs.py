"""Image-caption pairs for objectives that read data mode "image_text" (BLIP-2's stage 1,
`train.blip2_stage1`): one image and its caption per sample, the caption tokenized for the
Q-Former's own tokenizer as BERT does it ([CLS] caption [SEP], cut to max_length with the
[SEP] kept), and an image id per sample so that captions of one image are never each other's
negatives.

Sources: a LLaVA-format JSON file whose records hold one image and exactly one assistant
turn (the caption; the user turn, e.g. LLaVA's "<image>\\nDescribe ...", is not read), or a
pairs file of {id, image, caption} entries (the shapes world's pairs_{split}.json). Both
come through `read_caption_records` as `llava_json.Record`s, so the pipeline checks images
and reports bad records as for the other modes.

Batch: pixel_values [B, H, W, C] float32, input_ids [B, max_length] int32 (padded with the
pad id), attention_mask [B, max_length] int32, image_ids [B] int32 (the index of the
sample's image among the distinct images of the source: equal for captions of one image,
the same on every process).
"""
from __future__ import annotations

import os

import numpy as np

from mllm_jax import storage
from mllm_jax.data import llava_json

CAPTION_ROLES = ("gpt", "assistant")


def special_ids(tokenizer) -> tuple:
    """(cls, sep, pad) ids: BERT's [CLS] / [SEP] when the tokenizer has them, else its BOS /
    EOS; pad: its pad id (else 0)."""
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    cls = specials.get("[CLS]", tokenizer.bos_id)
    sep = specials.get("[SEP]", tokenizer.eos_id)
    if cls is None or sep is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'source', '')}: captions are "
                         "tokenized as [CLS] caption [SEP]; the tokenizer has neither "
                         "[CLS]/[SEP] nor BOS/EOS tokens")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return int(cls), int(sep), int(pad)


def caption_ids(caption: str, tokenizer, max_length: int, specials=None) -> list:
    """[CLS] + the caption's tokens + [SEP], at most max_length ids ([SEP] kept)."""
    if max_length < 3:
        raise ValueError(f"data.max_length = {max_length}: a caption needs at least 3 tokens "
                         "([CLS], a word, [SEP])")
    cls, sep, _ = specials or special_ids(tokenizer)
    return [cls] + tokenizer.encode(caption)[:max_length - 2] + [sep]


def caption_of(record):
    """The caption text of a record (its one assistant turn), or (reason, detail) when the
    record is not an image-caption pair."""
    conv = getattr(record, "conversations", None)
    if not isinstance(conv, list):
        return "malformed_conversation", "'conversations' is not a list"
    answers = [m for m in conv if isinstance(m, dict) and m.get("from") in CAPTION_ROLES]
    if len(answers) != 1:
        return ("malformed_conversation", f"{len(answers)} assistant turns; an image-caption "
                "pair has exactly one (the caption)")
    text = answers[0].get("value")
    if not isinstance(text, str):
        return "malformed_conversation", "the caption is not a string"
    if not text.strip():
        return "empty_text", "the caption is empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return "text_not_encodable", f"caption: {e.object[e.start:e.end]!r} cannot be " \
                                     f"encoded as UTF-8 ({e.reason})"
    return text


def read_caption_records(path, image_root=None, *, allow_absolute_image_paths=False) -> list:
    """Records of a LLaVA JSON file or a pairs file ({id, image, caption} entries, image
    paths relative to `image_root`, default the file's directory)."""
    path = os.fspath(path)
    entries = llava_json.read_entries(path)
    if image_root is None:
        image_root = storage.dirname(storage.absolute(path))
    out = []
    for k, e in enumerate(entries):
        if isinstance(e, dict) and "conversations" not in e and "caption" in e:
            e = {"id": e.get("id", k), "image": e.get("image"),
                 "conversations": [{"from": "human", "value": "<image>"},
                                   {"from": "gpt", "value": e["caption"]}]}
        out.append(llava_json.record_from_dict(
            e, k, image_root, os.fspath(path),
            allow_absolute_image_paths=allow_absolute_image_paths))
    return out


def image_key(image) -> str:
    """What identifies an image (a path, or an in-memory image file's `.path`)."""
    return str(getattr(image, "path", image))


def image_index(records) -> dict:
    """{image key: index} of the distinct first images of `records`, in order of first
    appearance (the same on every process: every process holds every record)."""
    seen = {}
    for r in records:
        if r.images:
            seen.setdefault(image_key(r.images[0]), len(seen))
    return seen


def collate_pairs(rows, *, batch_size, max_length, image_shape, pad_id, sample_ids=None):
    """Examples {"input_ids", "pixels", "image_id"} -> the image_text batch."""
    ids = np.full((batch_size, max_length), pad_id, np.int32)
    mask = np.zeros((batch_size, max_length), np.int32)
    pixels = np.zeros((batch_size,) + tuple(image_shape), np.float32)
    image_ids = np.zeros((batch_size,), np.int32)
    for r, ex in enumerate(rows):
        n = len(ex["input_ids"])
        ids[r, :n] = ex["input_ids"]
        mask[r, :n] = 1
        pixels[r] = ex["pixels"][0]
        image_ids[r] = ex["image_id"]
    out = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask,
           "image_ids": image_ids}
    if sample_ids is not None:
        out["sample_ids"] = np.asarray([str(i) for i in sample_ids])
    return out
