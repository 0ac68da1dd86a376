"""LLaVA-format JSON data files: a list of {"id", "image" (a path or a list of paths, optional),
"conversations": [{"from": "human" | "gpt", "value": "..."}, ...]}; and preference files, a list of
{"id", "image" (optional), "prompt", "chosen", "rejected"} (`read_preference_json`).

Reading a file only parses it: image paths are joined to the image root but not opened, and
conversations are kept as they are. A path leading outside the root (`..`, absolute, or a
symlink out; see `data.paths`) becomes a `RefusedImage`, which the pipeline reports as
`outside_root`; `allow_absolute_image_paths=True` reads absolute paths wherever they are.
Checking a record (images readable, conversation well formed, placeholders matching images)
is the pipeline's job, so one bad record is counted and skipped there instead of failing the
whole file here.
"""
from __future__ import annotations

import dataclasses
import json
import os

from mllm_jax import storage
from mllm_jax.data.paths import OutsideRoot, resolve_image_path


@dataclasses.dataclass(frozen=True)
class Record:
    """One sample. `images` are full paths (joined to the image root), in placeholder order;
    `conversations` is the raw value of the file (possibly malformed); `index` is the position
    in the file (ids are not always unique in public LLaVA files)."""
    id: object
    images: tuple
    conversations: object
    index: int


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair: `prompt` (the user turn, with its <image> placeholders), `chosen`
    and `rejected` (assistant answers). Fields are the file's raw values (possibly not
    strings: the pipeline reports those as malformed)."""
    id: object
    images: tuple
    prompt: object
    chosen: object
    rejected: object
    index: int


@dataclasses.dataclass(frozen=True)
class RefusedImage:
    """An image entry that is not read: `path` as written, `reason` and `detail` (why)."""
    path: str
    reason: str
    detail: str


def _confined(path, image_root, allow_absolute):
    try:
        return resolve_image_path(image_root, path, allow_absolute=allow_absolute)
    except OutsideRoot as e:
        return RefusedImage(path, e.reason, str(e))
    except ValueError as e:  # e.g. a NUL byte in the path
        return RefusedImage(path, "unreadable_image", f"image path {path!r}: {e}")


def _images(entry, image_root, allow_absolute=False):
    image = entry.get("image")
    if image is None:
        images = ()
    elif isinstance(image, str):
        images = (image,)
    elif isinstance(image, (list, tuple)):
        images = tuple(image)
    else:
        images = (image,)  # not a path: reading it fails and is reported
    if image_root is not None:
        images = tuple(_confined(p, image_root, allow_absolute) if isinstance(p, str) else p
                       for p in images)
    return images


def record_from_dict(entry, index: int, image_root=None, source: str = "", *,
                     allow_absolute_image_paths: bool = False) -> Record:
    if not isinstance(entry, dict):
        # Kept as a record with no conversation: the pipeline reports it as malformed.
        return Record(f"{source}:{index}", (), entry, index)
    sample_id = entry.get("id")
    if sample_id is None:
        sample_id = f"{source}:{index}"
    return Record(sample_id, _images(entry, image_root, allow_absolute_image_paths),
                  entry.get("conversations"), index)


def preference_from_dict(entry, index: int, image_root=None, source: str = "", *,
                         allow_absolute_image_paths: bool = False) -> PreferenceRecord:
    if not isinstance(entry, dict):
        return PreferenceRecord(f"{source}:{index}", (), None, None, None, index)
    sample_id = entry.get("id")
    if sample_id is None:
        sample_id = f"{source}:{index}"
    return PreferenceRecord(sample_id, _images(entry, image_root, allow_absolute_image_paths),
                            entry.get("prompt"),
                            entry.get("chosen"), entry.get("rejected"), index)


def read_entries(path) -> list:
    """The raw entries of a LLaVA data file: a .json list or .jsonl lines."""
    with storage.open_file(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            entries = [json.loads(line) for line in f if line.strip()]
        else:
            entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a LLaVA data file holds a JSON list, got "
                         f"{type(entries).__name__}")
    return entries


def read_preference_json(path, image_root=None, *,
                         allow_absolute_image_paths: bool = False) -> list[PreferenceRecord]:
    """All preference pairs of a .json (a list) or .jsonl file; `image_root` defaults to the
    file's directory (image paths are confined to it, see the module docstring)."""
    path = os.fspath(path)
    if image_root is None:
        image_root = storage.dirname(storage.absolute(path))
    source = os.path.basename(path)
    return [preference_from_dict(e, k, image_root, source,
                                 allow_absolute_image_paths=allow_absolute_image_paths)
            for k, e in enumerate(read_entries(path))]


def read_llava_json(path, image_root=None, *,
                    allow_absolute_image_paths: bool = False) -> list[Record]:
    """All records of a LLaVA-format .json file (a list) or .jsonl file (one object a line).
    `image_root` defaults to the file's directory (image paths are confined to it, see the
    module docstring)."""
    path = os.fspath(path)
    if image_root is None:
        image_root = storage.dirname(storage.absolute(path))
    source = os.path.basename(path)
    return [record_from_dict(e, k, image_root, source,
                             allow_absolute_image_paths=allow_absolute_image_paths)
            for k, e in enumerate(read_entries(path))]
