"""TFDS builder (array_record files, no TensorFlow) for the shapes world.

One example per scene: the PNG bytes, the objects (name, shape, colour, size, position, pixel
box, texture), the captions (faithful short and detailed captions, and the training caption,
which may name a hallucinated companion), the instruction questions of the scene (kind,
question, answer) and its POPE items (mode, question, answer). Splits, sizes and seed come
from the config; examples equal what `scenes.make_split` and the record functions of
`records` produce for the same seed.

    builder = make_builder({"train": 1000, "val": 100}, seed=0, data_dir="tfds_dir")
    builder.download_and_prepare()
    records = list(pipeline_records(builder, "train", "instruct"))  # LlavaPipeline input
"""
from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mllm_jax.data.tfds_builders import ImageBytes, TfdsRecord, as_text, sequence_column
from mllm_jax.demo.captions import CAPTION_PROMPT, detailed_caption, short_caption
from mllm_jax.demo.questions import conversation, pope_questions, statistics
from mllm_jax.demo.records import caption_record, instruct_record
from mllm_jax.demo.scenes import STREAM_EVAL, World, image_path, make_split, scene_rng

VERSION = "1.0.0"
RECORD_KINDS = ("captions", "instruct")


class ShapesConfig(tfds.core.BuilderConfig):
    """Split sizes, seed and world of a build; the name defaults to "seed{seed}"."""

    def __init__(self, *, sizes=None, seed: int = 0, world: World | None = None,
                 turns: int = 3, name=None, **kwargs):
        super().__init__(name=name or f"seed{seed}", version=VERSION, **kwargs)
        self.sizes = dict(sizes or {"train": 1000, "val": 100, "test": 100})
        self.seed = int(seed)
        self.world = world or World()
        self.turns = int(turns)


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class ShapesWorld(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The shapes world as a TFDS data set; see the module docstring."""
    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, config: ShapesConfig | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config or ShapesConfig(), **kwargs)

    def _info(self):
        text = tfds.features.Text
        return self.dataset_info_from_configs(
            description="Procedural scenes of coloured shapes with captions and questions.",
            features=tfds.features.FeaturesDict({
                "id": text(),
                "index": tfds.features.Scalar(dtype=np.int64),
                "image_path": text(),
                "image": tfds.features.Tensor(shape=(), dtype=np.bytes_),  # PNG file bytes
                "objects": tfds.features.Sequence({
                    "name": text(), "shape": text(), "colour": text(), "size": text(),
                    "position": text(), "texture": text(),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.int32)}),
                "caption": text(),
                "detailed_caption": text(),
                "training_caption": text(),
                "hallucinated": tfds.features.Sequence(text()),
                "questions": tfds.features.Sequence({"kind": text(), "question": text(),
                                                     "answer": text()}),
                "pope": tfds.features.Sequence({"mode": text(), "object": text(),
                                                "question": text(), "answer": text()}),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        cfg = self.builder_config
        self.info.metadata["world"] = cfg.world.to_dict()
        self.info.metadata["seed"] = cfg.seed
        return {split: self._generate_examples(split, n) for split, n in cfg.sizes.items()}

    def _generate_examples(self, split, n):
        cfg, world = self.builder_config, self.builder_config.world
        scenes = make_split(split, n, cfg.seed, world)
        stats = statistics(scenes, world)
        for i, scene in enumerate(scenes):
            caption = caption_record(scene, cfg.seed, split, i, world)
            instruct = instruct_record(scene, cfg.seed, split, i, world, stats, cfg.turns)
            conv = instruct["conversations"]
            pope = pope_questions(scene, stats, scene_rng(cfg.seed, split, i, STREAM_EVAL))
            yield i, {
                "id": scene.id, "index": i, "image_path": image_path(scene.id),
                "image": _png(scene.image),
                "objects": [{"name": o.name, "shape": o.shape, "colour": o.colour,
                             "size": o.size, "position": world.cell_name(o.cell),
                             "texture": o.texture, "bbox": np.asarray(o.bbox, np.int32)}
                            for o in scene.objects],
                "caption": short_caption(scene.objects, None, world),
                "detailed_caption": detailed_caption(scene.objects, None, world),
                "training_caption": caption["conversations"][1]["value"],
                "hallucinated": caption["hallucinated"],
                "questions": [{"kind": k, "question": q["value"].replace("<image>\n", ""),
                               "answer": a["value"]}
                              for k, q, a in zip(instruct["kinds"], conv[::2], conv[1::2])],
                "pope": [{k: p[k] for k in ("mode", "object", "question", "answer")}
                         for p in pope],
            }


def make_builder(sizes=None, seed: int = 0, data_dir=None, *, world=None, turns: int = 3,
                 name=None, **kwargs) -> ShapesWorld:
    """A builder of the world; `.download_and_prepare()` writes it under `data_dir`."""
    config = ShapesConfig(sizes=sizes, seed=seed, world=world, turns=turns, name=name)
    return ShapesWorld(config=config, data_dir=data_dir and os.fspath(data_dir), **kwargs)


def _rows(seq, keys) -> list:
    cols = {k: sequence_column(seq, k) for k in keys}
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: cols[k][j] for k in keys} for j in range(n)]


def decode_example(example) -> dict:
    """A stored example as plain Python: text as str, boxes as int tuples, image as bytes."""
    objects = [{k: (tuple(int(v) for v in o[k]) if k == "bbox" else as_text(o[k])) for k in o}
               for o in _rows(example["objects"], ("name", "shape", "colour", "size",
                                                   "position", "texture", "bbox"))]
    return {
        "id": as_text(example["id"]), "index": int(example["index"]),
        "image_path": as_text(example["image_path"]), "image": bytes(example["image"]),
        "objects": objects,
        **{k: as_text(example[k]) for k in ("caption", "detailed_caption", "training_caption")},
        "hallucinated": [as_text(h) for h in example["hallucinated"]],
        "questions": [{k: as_text(v) for k, v in q.items()}
                      for q in _rows(example["questions"], ("kind", "question", "answer"))],
        "pope": [{k: as_text(v) for k, v in p.items()}
                 for p in _rows(example["pope"], ("mode", "object", "question", "answer"))],
    }


def examples(source, split: str = "train"):
    """Decoded examples of a built split, in scene order. `source` is a prepared builder or
    the directory of a prepared version."""
    builder = source if isinstance(source, tfds.core.DatasetBuilder) \
        else tfds.builder_from_directory(os.fspath(source))
    data = builder.as_data_source(split=split)
    for k in range(len(data)):
        yield decode_example(data[k])


def pipeline_records(source, split: str = "train", kind: str = "instruct"):
    """`LlavaPipeline` records (images in memory): "captions" (the training caption) or
    "instruct" (the scene's questions as one conversation)."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; one of {RECORD_KINDS}")
    for ex in examples(source, split):
        if kind == "captions":
            pairs = [(CAPTION_PROMPT, ex["training_caption"])]
        else:
            pairs = [(q["question"], q["answer"]) for q in ex["questions"]]
        yield TfdsRecord(id=ex["id"], images=(ImageBytes(ex["image_path"], ex["image"]),),
                         conversations=conversation(pairs), index=ex["index"])
