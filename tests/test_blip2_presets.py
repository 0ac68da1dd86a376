"""The BLIP-2 / InstructBLIP presets have exactly the parameters (names, shapes, count) of the
transformers models built on the meta device from the config.json we write for them."""
import re

import numpy as np
import pytest
import torch
import transformers

import mllm_jax
from mllm_jax import presets
from mllm_jax.convert import hf_config, hf_io, hf_keys

# Published sizes (rounded), a check on the meta-model comparison itself.
APPROX_BILLIONS = {"blip2-opt-2.7b": 3.74, "blip2-flan-t5-xl": 3.94,
                   "instructblip-vicuna-7b": 7.91, "instructblip-flan-t5-xl": 4.02}
CLASSES = {"blip-2": (transformers.Blip2Config, transformers.Blip2ForConditionalGeneration),
           "instructblip": (transformers.InstructBlipConfig,
                            transformers.InstructBlipForConditionalGeneration)}


def hf_meta_model(cfg):
    d = hf_config.to_hf(cfg)
    config_cls, model_cls = CLASSES[d["model_type"]]
    with torch.device("meta"):
        model = model_cls(config_cls(**d))
        lm = model.language_model
        if cfg.text.model_type == "t5" and not cfg.text.tie_word_embeddings:
            # Flan-T5's head is its own tensor; transformers 5 ties it unless a checkpoint
            # stores one.
            lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.shared.weight))
    return model


def hf_shapes(model, cfg):
    skip = mllm_jax.models.registry.family(cfg).unused_keys(cfg)
    out = {}
    for k, v in model.state_dict().items():
        k = hf_keys.canonical_key(k, cfg.model_type)
        if any(re.search(p, k) for p in hf_keys.IGNORED_KEYS + skip):
            continue
        out[k] = tuple(v.shape)
    return out


@pytest.mark.parametrize("name", sorted(APPROX_BILLIONS))
def test_preset_matches_the_transformers_meta_model(name):
    cfg = presets.get(name)
    model = mllm_jax.build_model(cfg)
    expected, flat = hf_io._expected(model)  # jax.eval_shape: nothing allocated
    n_ours = sum(int(np.prod(leaf.shape)) for leaf in flat.values())
    torch_model = hf_meta_model(cfg)
    assert n_ours == sum(p.numel() for p in torch_model.parameters())
    assert abs(n_ours / 1e9 - APPROX_BILLIONS[name]) < 0.01 * APPROX_BILLIONS[name], n_ours
    ours = {k: tuple(shape) for k, (_, _, shape) in expected.items()}
    theirs = hf_shapes(torch_model, cfg)
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
