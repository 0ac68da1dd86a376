"""TFDS builders (array_record files) for LLaVA-format JSON, and a reader back to records.

Three kinds, each a `tfds.core.GeneratorBasedBuilder` configured with a JSON (or .jsonl) file
and an image root, reading local files only:

- "captions"      blip_laion_cc_sbu_558k.json-style: {id, image, conversations}; a record
                  without an image is skipped (a caption needs its image).
- "instructions"  llava_v1_5_mix665k.json-style: {id, image (a path, a list, or absent),
                  conversations}; multi-turn, multi-image and text-only samples.
- "preferences"   {id, image (optional, a path or a list), prompt, chosen, rejected}.

Images are stored as the file's bytes, untouched (`{"path": the path as written in the JSON,
"bytes": the file's bytes}`), not as a `tfds.features.Image`: that feature decodes with TF to a
fixed channel count, losing what the pipeline's PIL decoding relies on (EXIF orientation,
alpha composited onto white, palettes, 16-bit). With the bytes, decoding a built record gives
exactly the pixels decoding the file gives.

Records that cannot be stored are skipped at build time instead of failing the build, and
reported in `builder.info.metadata["skipped"]` (saved as metadata.json next to the data):
{"count": n, "by_reason": {reason: n}, "records": [{"index", "id", "reason", "detail"}]}.
Reasons: "missing_image" (an image file does not exist under the root), "outside_root" (an
image path leading outside the root; `data.paths`: absolute paths are allowed with
`allow_absolute_image_paths=True`), "text_not_encodable" (a string UTF-8 cannot hold,
such as a lone surrogate), "no_image" (captions only), "malformed" (not an
object, an image entry that is not a path, conversations that are not a list of
{"from": str, "value": str}, preference fields that are not strings). Only what the
features cannot hold is checked here; conversation semantics (placeholders matching
images, empty turns) stay the pipeline's job, as for JSON files.

Ids are stored as text (an integer id 7 reads back as "7"); `index`, the position in the
JSON file, is stored too (ids are not always unique in public LLaVA files) and is the key.
Extra keys in a turn (beyond from/value) are dropped.

    builder = make_builder("instructions", "llava_v1_5_mix665k.json", "data/", "tfds_dir")
    builder.download_and_prepare()
    records = list(records_from_tfds(builder))           # TfdsRecord, images as bytes
    pipeline = LlavaPipeline(records, ...)               # reads the in-memory images as is
    # preferences: LlavaPipeline(records, ..., mode="dpo")
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mllm_jax.data.llava_json import read_entries
from mllm_jax.data.paths import OUTSIDE_ROOT, OutsideRoot, resolve_image_path
from mllm_jax.data.tfds_features import check_features

KINDS = ("captions", "instructions", "preferences")
MISSING_IMAGE = "missing_image"
NO_IMAGE = "no_image"
MALFORMED = "malformed"
TEXT_NOT_ENCODABLE = "text_not_encodable"
VERSION = "1.0.0"

log = logging.getLogger(__name__)


class LlavaJsonConfig(tfds.core.BuilderConfig):
    """One JSON file + its image root. The config name (the directory under the builder's)
    defaults to the JSON file's name, e.g. "llava_v1_5_mix665k"."""

    def __init__(self, *, json_path, image_root=None, name=None,
                 allow_absolute_image_paths=False, **kwargs):
        json_path = os.path.abspath(os.fspath(json_path))
        if name is None:
            stem = os.path.basename(json_path).rsplit(".", 1)[0]
            name = re.sub(r"[^a-z0-9_]", "_", stem.lower()) or "default"
        super().__init__(name=name, version=VERSION, **kwargs)
        self.json_path = json_path
        self.image_root = (os.path.dirname(json_path) if image_root is None
                           else os.path.abspath(os.fspath(image_root)))
        self.allow_absolute_image_paths = bool(allow_absolute_image_paths)


def _image_features():
    return tfds.features.Sequence({
        "path": tfds.features.Text(),
        "bytes": tfds.features.Tensor(shape=(), dtype=np.bytes_),
    })


class _LlavaJsonBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    KIND = ""

    def __init__(self, *, json_path=None, image_root=None, config=None, **kwargs):
        if config is None:
            if json_path is None:
                raise ValueError("pass json_path (and image_root) or a LlavaJsonConfig")
            config = LlavaJsonConfig(json_path=json_path, image_root=image_root)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _text_features(self) -> dict:
        return {"conversations": tfds.features.Sequence({"from": tfds.features.Text(),
                                                         "value": tfds.features.Text()})}

    def _info(self):
        return self.dataset_info_from_configs(
            description=f"LLaVA-format {self.KIND} from a local JSON file.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
                "images": _image_features(),
                **self._text_features(),
            }),
            metadata=tfds.core.MetadataDict(),
            # Keep the file order (the pipeline shuffles with its own seed); TFDS would
            # otherwise permute examples by a hash of their keys.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {"train": self._generate_examples()}

    def _entries(self):
        return read_entries(self.builder_config.json_path)

    def _generate_examples(self):
        skipped = []
        for index, entry in enumerate(self._entries()):
            sample_id = entry.get("id") if isinstance(entry, dict) else None
            sample_id = f"{os.path.basename(self.builder_config.json_path)}:{index}" \
                if sample_id is None else str(sample_id)
            try:
                example = self._example(entry, sample_id, index)
                _check_text(example)
            except _Skip as e:
                skipped.append({"index": index, "id": sample_id, "reason": e.reason,
                                "detail": e.detail})
                continue
            yield index, example
        by_reason = collections.Counter(s["reason"] for s in skipped)
        self.info.metadata["skipped"] = {"count": len(skipped), "by_reason": dict(by_reason),
                                         "records": skipped}
        if skipped:
            log.warning("%s: skipped %d records (%s); see metadata['skipped']",
                        self.builder_config.json_path, len(skipped), dict(by_reason))

    def _images(self, entry) -> list:
        image = entry.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise _Skip(MALFORMED, f"image entry is not a path or a list of paths: {image!r}")
        images = []
        for p in paths:
            try:
                full = resolve_image_path(
                    self.builder_config.image_root, p,
                    allow_absolute=self.builder_config.allow_absolute_image_paths)
            except OutsideRoot as e:
                raise _Skip(OUTSIDE_ROOT, str(e)) from None
            except ValueError as e:  # e.g. a NUL byte in the path
                raise _Skip(MALFORMED, f"image path {p!r}: {e}") from None
            if not os.path.isfile(full):
                raise _Skip(MISSING_IMAGE, f"no such file {full!r}")
            with open(full, "rb") as f:
                images.append({"path": p, "bytes": f.read()})
        return images

    def _example(self, entry, sample_id, index) -> dict:
        if not isinstance(entry, dict):
            raise _Skip(MALFORMED, f"record is a {type(entry).__name__}, not an object")
        conversations = entry.get("conversations")
        if not isinstance(conversations, list) or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str)
                and isinstance(t.get("value"), str) for t in conversations):
            raise _Skip(MALFORMED, "conversations is not a list of {from: str, value: str}")
        images = self._images(entry)
        return {"id": sample_id, "index": index, "images": images,
                "conversations": [{"from": t["from"], "value": t["value"]}
                                  for t in conversations]}


def _check_text(value, where=""):
    """`_Skip` (TEXT_NOT_ENCODABLE) for a string UTF-8 cannot hold (a lone surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Skip(TEXT_NOT_ENCODABLE, f"{where or 'text'}: {e.object[e.start:e.end]!r} "
                                            f"at position {e.start} cannot be encoded as "
                                            f"UTF-8 ({e.reason})") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(item, f"{where}/{key}" if where else key)
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _check_text(item, f"{where}[{k}]")


class _Skip(Exception):
    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class LlavaCaptions(_LlavaJsonBuilder, skip_registration=True):
    """Image-caption pairs (alignment pre-training), e.g. blip_laion_cc_sbu_558k.json."""
    KIND = "captions"

    def _example(self, entry, sample_id, index):
        example = super()._example(entry, sample_id, index)
        if not example["images"]:
            raise _Skip(NO_IMAGE, "a caption record without an image")
        return example


class LlavaInstructions(_LlavaJsonBuilder, skip_registration=True):
    """Instruction data (multi-turn, multi-image, text-only), e.g. llava_v1_5_mix665k.json."""
    KIND = "instructions"


class LlavaPreferences(_LlavaJsonBuilder, skip_registration=True):
    """Preference pairs {id, image, prompt, chosen, rejected} for DPO-style alignment tuning."""
    KIND = "preferences"
    FIELDS = ("prompt", "chosen", "rejected")

    def _text_features(self):
        return {k: tfds.features.Text() for k in self.FIELDS}

    def _example(self, entry, sample_id, index):
        if not isinstance(entry, dict):
            raise _Skip(MALFORMED, f"record is a {type(entry).__name__}, not an object")
        bad = [k for k in self.FIELDS if not isinstance(entry.get(k), str)]
        if bad:
            raise _Skip(MALFORMED, f"{', '.join(bad)} missing or not a string")
        return {"id": sample_id, "index": index, "images": self._images(entry),
                **{k: entry[k] for k in self.FIELDS}}


BUILDERS = {"captions": LlavaCaptions, "instructions": LlavaInstructions,
            "preferences": LlavaPreferences}


def make_builder(kind: str, json_path, image_root=None, data_dir=None, *, name=None,
                 allow_absolute_image_paths=False, **kwargs) -> _LlavaJsonBuilder:
    """A builder of `kind` (captions | instructions | preferences) for one JSON file; call
    `.download_and_prepare()` on it to write the array_record files under `data_dir`.
    Image paths must resolve inside `image_root` (see `data.paths`)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    config = LlavaJsonConfig(json_path=json_path, image_root=image_root, name=name,
                             allow_absolute_image_paths=allow_absolute_image_paths)
    return BUILDERS[kind](config=config, data_dir=data_dir and os.fspath(data_dir), **kwargs)


def skipped_report(builder) -> dict:
    """The build's skipped-record report (see the module docstring)."""
    return dict(builder.info.metadata.get("skipped", {"count": 0, "by_reason": {},
                                                      "records": []}))


# ---- reading back -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageBytes:
    """An image file's bytes as stored, and its path as written in the JSON."""
    path: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class TfdsRecord:
    """A captions/instructions record read back: `llava_json.Record`'s fields, with images in
    memory (`LlavaPipeline` decodes them from the bytes)."""
    id: str
    images: tuple  # of ImageBytes
    conversations: list  # of {"from": str, "value": str}
    index: int


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """A preference pair read back: `llava_json.PreferenceRecord`'s fields, images in memory
    (`LlavaPipeline(..., mode="dpo")` reads these as they are)."""
    id: str
    images: tuple  # of ImageBytes
    prompt: str
    chosen: str
    rejected: str
    index: int


def as_text(value) -> str:
    """A decoded TFDS text feature (bytes or str) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def sequence_column(seq, key) -> list:
    """A decoded Sequence({...}) is a dict of columns (arrays or lists); [] when empty."""
    return list(seq[key]) if key in seq else []


def _record(example):
    images = tuple(ImageBytes(as_text(p), bytes(b)) for p, b in
                   zip(sequence_column(example["images"], "path"),
                       sequence_column(example["images"], "bytes")))
    common = dict(id=as_text(example["id"]), images=images, index=int(example["index"]))
    if "prompt" in example:
        return PreferenceRecord(prompt=as_text(example["prompt"]),
                                chosen=as_text(example["chosen"]),
                                rejected=as_text(example["rejected"]), **common)
    convs = example["conversations"]
    turns = [{"from": as_text(f), "value": as_text(v)}
             for f, v in zip(sequence_column(convs, "from"), sequence_column(convs, "value"))]
    return TfdsRecord(conversations=turns, **common)


def records_from_tfds(source, split: str = "train"):
    """Yield the records of a built split, in file order: TfdsRecord (captions, instructions)
    or PreferenceRecord. `source` is a prepared builder or the directory of a prepared
    version (…/llava_instructions/<config>/1.0.0); reads through the array_record data
    source (random access, no TF graph). A directory whose features name types other than
    ours is refused before TFDS reads it (`tfds_features.check_features`)."""
    if isinstance(source, tfds.core.DatasetBuilder):
        builder = source
    else:
        check_features(source)
        builder = tfds.builder_from_directory(os.fspath(source))
    data = builder.as_data_source(split=split)
    for k in range(len(data)):
        yield _record(data[k])
