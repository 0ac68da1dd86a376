"""Training and prompting data: tokenizers read from a checkpoint (`load_tokenizer`), HF's
image processors (`preprocess`, `preprocess_image`), conversation templates with their label
masks (`build_example`, `build_prompt`), LLaVA-format JSON files (`read_llava_json`,
`read_preference_json`), TFDS copies of them (`make_builder`, `records_from_tfds`), the input
pipelines (`LlavaPipeline`, `MixturePipeline`, `SyntheticSource`) and the source a training
config names (`make_data`).

The names are imported on first use (module `__getattr__`): `data.sources` imports
`train.objectives` and `train.loop` imports `data.sources`, so importing them here eagerly
would be a cycle; and `mllm_jax.data.tfds_builders` pulls in tensorflow_datasets.
"""
import importlib
from typing import TYPE_CHECKING

# Public name -> the module that defines it.
_EXPORTS = {
    "Tokenizer": "mllm_jax.data.tokenizer",
    "load_tokenizer": "mllm_jax.data.tokenizer",
    "ImageProcessorConfig": "mllm_jax.data.image",
    "load_image_processor_config": "mllm_jax.data.image",
    "preprocess": "mllm_jax.data.image",
    "preprocess_image": "mllm_jax.data.image",
    "build_example": "mllm_jax.data.templates",
    "build_prompt": "mllm_jax.data.templates",
    "read_llava_json": "mllm_jax.data.llava_json",
    "read_preference_json": "mllm_jax.data.llava_json",
    "make_builder": "mllm_jax.data.tfds_builders",
    "records_from_tfds": "mllm_jax.data.tfds_builders",
    "LlavaPipeline": "mllm_jax.data.pipeline",
    "MixturePipeline": "mllm_jax.data.mixture",
    "SyntheticSource": "mllm_jax.data.synthetic",
    "make_data": "mllm_jax.data.sources",
    "expand_image_tokens": "mllm_jax.data.tokens",
}

__all__ = ["Tokenizer", "load_tokenizer", "ImageProcessorConfig", "load_image_processor_config",
           "preprocess", "preprocess_image", "build_example", "build_prompt", "read_llava_json",
           "read_preference_json", "make_builder", "records_from_tfds", "LlavaPipeline",
           "MixturePipeline", "SyntheticSource", "make_data", "expand_image_tokens"]

if TYPE_CHECKING:
    from mllm_jax.data.image import (ImageProcessorConfig, load_image_processor_config,
                                     preprocess, preprocess_image)
    from mllm_jax.data.llava_json import read_llava_json, read_preference_json
    from mllm_jax.data.mixture import MixturePipeline
    from mllm_jax.data.pipeline import LlavaPipeline
    from mllm_jax.data.sources import make_data
    from mllm_jax.data.synthetic import SyntheticSource
    from mllm_jax.data.templates import build_example, build_prompt
    from mllm_jax.data.tfds_builders import make_builder, records_from_tfds
    from mllm_jax.data.tokenizer import Tokenizer, load_tokenizer
    from mllm_jax.data.tokens import expand_image_tokens


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
