"""What a benchmark task is (`Task`, `Sample`) and the file helpers the loaders share."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Optional

from mllm_jax.data.paths import OutsideRoot, resolve_image_path

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
DETAIL_PROMPT = "Please describe this image in detail."
# How answers are scored: as the benchmark's official script does, or as lmms-eval 0.7.3
# does (`mllm_jax.eval.lmms_eval_scoring`).
SCORINGS = ("official", "lmms_eval")
# File name endings taken for images when a loader scans a directory.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


@dataclasses.dataclass
class Sample:
    """One benchmark question.  ``doc_id`` (0..n-1 in load order) is unique;
    ``sample_id`` is the benchmark's own id and may repeat (POPE ids restart per
    split, MME asks two questions per image).  ``question`` holds neither the image
    token nor the task's ``prompt_suffix``; ``target`` and ``meta`` are JSON-ready."""

    doc_id: int
    sample_id: str
    images: list
    question: str
    target: object
    meta: dict


# ----------------------------------------------------------------------------- file helpers
def read_json(path: str):
    """The parsed JSON file; ``ValueError`` naming the file if missing or invalid."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def iter_jsonl(path: str) -> Iterator[tuple]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, "
                                 f"got {type(obj).__name__}")
            yield lineno, obj


def require_keys(obj, keys, where: str) -> None:
    """``ValueError`` at ``where`` unless ``obj`` is a dict holding every key of ``keys``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} "
                         f"(expected keys {', '.join(keys)})")


class ImageRoot(str):
    """The directory a task's image paths are relative to, and whether absolute paths may
    lead out of it (``allow_absolute``; ``eval --allow-absolute-image-paths``)."""

    allow_absolute: bool = False

    def __new__(cls, path, allow_absolute: bool = False):
        root = super().__new__(cls, os.fspath(path))
        root.allow_absolute = bool(allow_absolute)
        return root


def image_path(root: str, rel: str, where: str) -> str:
    """``root/rel``; ``ValueError`` at ``where`` if that file does not exist or lies
    outside ``root`` (``mllm_jax.data.paths``: ``..``, absolute paths and symlinks leading
    out are refused, absolute ones allowed when ``root`` is an ``ImageRoot`` that says so)."""
    if not isinstance(rel, str):
        raise ValueError(f"{where}: image entry is not a path: {rel!r}")
    try:
        path = resolve_image_path(root, rel,
                                  allow_absolute=getattr(root, "allow_absolute", False))
    except OutsideRoot as e:
        raise ValueError(f"{where}: {e}; with eval, pass --image-root (the folder holding "
                         f"the images) or --allow-absolute-image-paths") from None
    except ValueError as e:  # e.g. a NUL byte in the path
        raise ValueError(f"{where}: image path {rel!r}: {e}") from None
    if not os.path.isfile(path):
        raise ValueError(f"{where}: image {path} not found (image_root={root!r})")
    return path


def strip_suffix(text: str, suffix: str) -> str:
    """``text`` stripped, without a trailing (stripped) ``suffix``."""
    text = text.strip()
    s = suffix.strip()
    if s and text.endswith(s):
        text = text[: -len(s)].strip()
    return text


def check_limit(limit: Optional[int]) -> Optional[int]:
    """``limit`` if it is None or a non-negative int, else ``ValueError``."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    return limit


def take_first(items: list, limit: Optional[int]) -> list:
    """The first ``limit`` items (all of them when ``limit`` is None)."""
    return items if limit is None else items[:limit]


def data_directory(data: str) -> str:
    """``data`` if it is a directory, else the directory holding the file ``data``."""
    return data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))


def check_result_count(processed: list, samples: list) -> None:
    """``ValueError`` unless there is one processed result per sample."""
    if len(processed) != len(samples):
        raise ValueError(f"aggregate got {len(processed)} results for {len(samples)} samples")


def check_scoring(scoring: str) -> str:
    """``scoring`` if it is one of SCORINGS, else ``ValueError`` naming the choices."""
    if scoring not in SCORINGS:
        raise ValueError(f"--scoring must be one of {', '.join(SCORINGS)}, got {scoring!r} "
                         f"(EvalOptions.scoring)")
    return scoring


def mean_or_zero(xs) -> float:
    """The mean of ``xs``; 0.0 when empty."""
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


# ----------------------------------------------------------------------------- base
class Task:
    """One benchmark: loader, prompt convention, scorer and aggregate."""

    name: str = ""
    output_type: str = "generate_until"
    max_new_tokens: int = 16
    prompt_suffix: str = ""
    answer_from_end: bool = True

    def load(self, data: str, image_root: Optional[str] = None,
             limit: Optional[int] = None, *, allow_absolute_image_paths: bool = False) -> list:
        """The samples of ``data``; image paths must resolve inside ``image_root`` (default:
        the data's directory), absolute ones anywhere with ``allow_absolute_image_paths``."""
        raise NotImplementedError

    def process_result(self, sample: Sample, response: str, scoring: str = "official") -> dict:
        """The per-sample results of ``response``, scored as ``scoring`` (one of SCORINGS)
        says: the official script's rules, or lmms-eval's ``process_results``."""
        if check_scoring(scoring) == "lmms_eval":
            return self.process_result_lmms_eval(sample, response)
        return self.process_result_official(sample, response)

    def aggregate(self, processed: list, samples: list, scoring: str = "official") -> dict:
        """Metric name -> value over ``process_result`` outputs of the same ``scoring``."""
        check_scoring(scoring)
        check_result_count(processed, samples)
        if scoring == "lmms_eval":
            return self.aggregate_lmms_eval(processed, samples)
        return self.aggregate_official(processed, samples)

    def require_scoring(self, scoring: str) -> None:
        """Raises before any answer is generated when ``scoring`` cannot run here (a
        library it needs is missing)."""
        check_scoring(scoring)

    def process_result_official(self, sample: Sample, response: str) -> dict:
        raise NotImplementedError

    def aggregate_official(self, processed: list, samples: list) -> dict:
        raise NotImplementedError

    def process_result_lmms_eval(self, sample: Sample, response: str) -> dict:
        raise NotImplementedError

    def aggregate_lmms_eval(self, processed: list, samples: list) -> dict:
        raise NotImplementedError

    def extract_answer(self, response: str) -> str:
        """The text after the last ``answer:`` (any case, markdown bold allowed),
        stripped; the response unchanged when there is no such marker."""
        marks = list(re.finditer(r"answer\**\s*:", response, flags=re.IGNORECASE))
        if not marks:
            return response
        return response[marks[-1].end():].strip(" \t\r\n*")

    def __repr__(self) -> str:
        return f"<Task {self.name}>"
