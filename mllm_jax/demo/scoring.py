"""Scoring a model's text against the scenes: CHAIR (the objects a caption mentions) and
whether an answer to an eval question (of `eval_{split}.json`) is right.
"""
from __future__ import annotations

import functools
import re

import numpy as np

from mllm_jax.demo.captions import NUMBER_WORDS
from mllm_jax.demo.scenes import World, chair_synonyms
from mllm_jax.eval.chair import ChairEvaluator
from mllm_jax.eval.pope import parse_yes_no


@functools.lru_cache(maxsize=8)
def chair_evaluator(world: World = World()) -> ChairEvaluator:
    return ChairEvaluator(synonyms=chair_synonyms(world))


def mentioned_objects(text: str, world: World = World()) -> list:
    """Canonical objects ("red circle") mentioned in `text`, in order, with multiplicity."""
    return chair_evaluator(world).mentioned_objects(text)


def chair_scores(captions: dict, gt_objects: dict, world: World = World()) -> dict:
    """CHAIR_i / CHAIR_s of generated captions (id -> text) against the objects of each scene
    (id -> names); see `ChairEvaluator.chair`."""
    return chair_evaluator(world).chair(captions, gt_objects)


def parse_box(text: str):
    """The first "[a, b, c, d]" in text as four floats, or None."""
    m = re.search(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
                  r"\s*(-?\d+(?:\.\d+)?)\s*\]", text)
    return tuple(float(v) for v in m.groups()) if m else None


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def _number(text):
    lower = text.lower()
    if "answer:" in lower:
        lower = lower.rsplit("answer:", 1)[1]
    for w in _words(lower):
        if w.isdigit():
            return int(w)
        if w in NUMBER_WORDS or w == "zero":
            return 0 if w in ("zero", "no") else NUMBER_WORDS.index(w)
    return None


def answer_correct(entry: dict, prediction: str, world: World = World()) -> bool:
    """Whether a model's answer to an eval entry (of `eval_{split}.json`) is right."""
    kind, answer = entry["kind"], entry["answer"]
    if kind in ("existence", "pope"):
        return parse_yes_no(prediction) == answer
    if kind == "count":
        return _number(prediction) == int(answer)
    if kind == "cot_count":
        return _number(prediction) == int(entry["count"])
    if kind == "colour":
        found = [w for w in _words(prediction) if w in world.colours]
        return bool(found) and found[0] == answer
    if kind == "position":
        words = [w for w in _words(prediction) if w not in ("the", "at", "in", "is", "it")]
        return " ".join(words) == answer
    if kind == "box":
        box = parse_box(prediction)
        return box is not None and box_iou(box, parse_box(answer)) >= 0.5
    if kind == "what_at":
        return entry["object"] in mentioned_objects(prediction, world)[:1]
    if kind == "fewshot":
        return _words(prediction) == _words(answer)
    raise ValueError(f"eval kind {kind!r} has no single right answer (score captions with "
                     f"CIDEr / chair_scores)")


def accuracy_by_kind(entries, predictions, world: World = World()) -> dict:
    """{kind: accuracy} over the scored kinds (POPE by mode as "pope_<mode>")."""
    hits = {}
    for e, p in zip(entries, predictions):
        if e["kind"] in ("caption", "detail"):
            continue
        key = f"pope_{e['pope_mode']}" if e["kind"] == "pope" else e["kind"]
        hits.setdefault(key, []).append(answer_correct(e, p, world))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
