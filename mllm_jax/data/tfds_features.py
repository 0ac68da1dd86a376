"""Reading a TFDS directory without importing the modules its metadata names.

TFDS rebuilds a dataset's features from `features.json` (or the `features` entry of
`dataset_info.json`) by class name, and imports the module such a name points to when the
class is not known yet: a copy someone else prepared could make reading it import any
installed module. `check_features(directory)` reads those files first, as plain JSON, and
accepts only the feature types the copies of mllm_jax are made of (`FeaturesDict`,
`Sequence`, `Tensor`, `Text`, `Scalar`); any other type name is refused with an error naming
the file, the feature and the type, before TFDS sees the directory.
"""
from __future__ import annotations

import functools
import json
import os

from mllm_jax import storage

FILES = ("features.json", "dataset_info.json")


class UnknownFeatureType(ValueError):
    """A TFDS directory names a feature type outside `allowed_types()`."""


@functools.lru_cache(maxsize=1)
def allowed_types() -> frozenset:
    """The fully qualified class names of the feature types our TFDS copies use."""
    import tensorflow_datasets as tfds
    f = tfds.features
    return frozenset(f"{c.__module__}.{c.__name__}"
                     for c in (f.FeaturesDict, f.Sequence, f.Tensor, f.Text, f.Scalar))


def feature_types(obj, where: str = ""):
    """(where, type name) of every feature in a features JSON value: the proto form's
    "pythonClassName" and the legacy form's {"type": name, "content": ...}."""
    if isinstance(obj, dict):
        name = obj.get("pythonClassName")
        if name is not None:
            yield where or "/", name
        if isinstance(obj.get("type"), str) and "content" in obj:
            yield where or "/", obj["type"]
        for key, value in obj.items():
            yield from feature_types(value, f"{where}/{key}")
    elif isinstance(obj, list):
        for k, value in enumerate(obj):
            yield from feature_types(value, f"{where}/{k}")


def check_features(directory) -> None:
    """`UnknownFeatureType` (a ValueError) if the TFDS directory's features name a type we
    do not write; ValueError if its metadata is not JSON. Missing files are TFDS's to report."""
    directory = os.fspath(directory)
    for name in FILES:
        path = storage.join(directory, name)
        if not storage.isfile(path):
            continue
        try:
            with storage.open_file(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if name == "dataset_info.json":
            data = data.get("features") if isinstance(data, dict) else None
        for where, type_name in feature_types(data):
            if type_name not in allowed_types():
                known = ", ".join(sorted(t.rsplit(".", 1)[-1] for t in allowed_types()))
                raise UnknownFeatureType(
                    f"{path}: feature {where} has type {type_name!r}, not one of the types "
                    f"mllm_jax's TFDS copies are made of ({known}); not read, since TFDS "
                    f"would import the module that name points to. Use a copy made by "
                    f"mllm_jax (eval --copy-to, data.tfds_builders)")
