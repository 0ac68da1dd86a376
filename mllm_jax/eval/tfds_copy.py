"""A self-contained TFDS (array_record) copy of a benchmark: the samples a task loads from its
published files, with every image's bytes inside, so `mllm-jax eval` can run where only the
copy is (a bucket, a TPU VM) and never touch the original image folders.

    mllm-jax eval --task pope --data coco_pope_random.json --image-root val2014 --copy-to DIR
    mllm-jax eval --task pope --data DIR/eval_samples/pope/1.0.0 --ckpt CKPT

A copy holds, per sample: `doc_id`, `sample_id`, the images (`{"path", "bytes"}`, the file's
bytes untouched), `question`, and `target` / `meta` as JSON text. Reading it back gives the
task's samples with the images as bytes (decoded like the files), so the scores equal those
of the original files (`tests/test_eval_tfds.py`). The task's name is stored in the copy and
checked when it is read; a copy naming feature types other than the ones written here is
refused before TFDS reads it.
"""
from __future__ import annotations

import json
import os

import numpy as np

VERSION = "1.0.0"


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - the [tfds] extra is missing
        raise ImportError("TFDS copies of benchmarks need tensorflow-datasets: "
                          "pip install 'mllm_jax[tfds]'") from e
    return tfds


def _builder_class():
    tfds = _tfds()

    class EvalSamples(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """The samples of one eval task; the config name is the task's."""
        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, task=None, samples=None, **kwargs):
            self._samples = samples
            config = tfds.core.BuilderConfig(name=task, version=VERSION) if task else None
            kwargs.setdefault("file_format", "array_record")
            super().__init__(config=config, **kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                description="Samples of an mllm_jax eval task, images included.",
                features=tfds.features.FeaturesDict({
                    "doc_id": tfds.features.Scalar(dtype=np.int64),
                    "sample_id": tfds.features.Text(),
                    "images": tfds.features.Sequence({
                        "path": tfds.features.Text(),
                        "bytes": tfds.features.Tensor(shape=(), dtype=np.bytes_)}),
                    "question": tfds.features.Text(),
                    "target": tfds.features.Text(),
                    "meta": tfds.features.Text(),
                }),
                metadata=tfds.core.MetadataDict(),
                disable_shuffling=True)

        def _split_generators(self, dl_manager):
            del dl_manager  # the samples are given
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            self.info.metadata["task"] = self.builder_config.name
            for s in self._samples:
                yield s.doc_id, {
                    "doc_id": s.doc_id, "sample_id": str(s.sample_id),
                    "images": [_image_entry(im, s) for im in s.images],
                    "question": s.question, "target": json.dumps(s.target),
                    "meta": json.dumps(s.meta)}

    return EvalSamples


def _image_entry(image, sample):
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"path": "", "bytes": bytes(image)}
    try:
        with open(image, "rb") as f:
            return {"path": os.fspath(image), "bytes": f.read()}
    except OSError as e:
        raise ValueError(f"sample {sample.sample_id!r} (doc {sample.doc_id}): cannot read "
                         f"image {image!r}: {e}") from e


def write_copy(task, samples, data_dir) -> str:
    """Builds the copy of `samples` (from `task.load`) under `data_dir`; returns the
    directory to pass as `--data` (…/eval_samples/<task>/1.0.0)."""
    builder = _builder_class()(task=task.name, samples=samples, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    return builder.data_dir


def is_copy(path) -> bool:
    """True for the directory of a prepared copy (it holds dataset_info.json)."""
    return os.path.isfile(os.path.join(os.fspath(path), "dataset_info.json"))


def read_copy(task, path, limit=None) -> list:
    """The task's samples from a copy, images as bytes, in doc_id order. A copy whose
    features name types other than ours is refused before TFDS reads it (TFDS would import
    the modules such names point to; `data.tfds_features`)."""
    from mllm_jax.data.tfds_features import check_features
    from mllm_jax.eval.tasks.base import Sample
    tfds = _tfds()
    check_features(path)
    builder = tfds.builder_from_directory(os.fspath(path))
    stored = builder.info.metadata.get("task") if builder.info.metadata else None
    if stored != task.name:
        raise ValueError(f"{path}: this is a copy of task {stored!r}, not {task.name!r}; "
                         f"pass --task {stored}")
    data = builder.as_data_source(split="test")
    n = len(data) if limit is None else min(limit, len(data))
    out = []
    for k in range(n):
        ex = data[k]
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        images = [bytes(b) for b in ex["images"]["bytes"]] if "bytes" in ex["images"] else []
        out.append(Sample(doc_id=int(ex["doc_id"]), sample_id=text(ex["sample_id"]),
                          images=images, question=text(ex["question"]),
                          target=json.loads(text(ex["target"])),
                          meta=json.loads(text(ex["meta"]))))
    return out
