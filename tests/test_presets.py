"""Named model configs: the 7B/13B/8B presets have exactly the parameters (names, shapes,
count) of the transformers models they stand for, and inspecting them allocates nothing."""
import functools
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

import mllm_jax
from mllm_jax import presets
from mllm_jax.convert import hf_config, hf_io, hf_keys
from test_convert import HUB_CONFIGS

BIG = ["llava-1.5-7b", "llava-1.5-13b", "llama-2-7b", "vicuna-7b-v1.5", "llama-3-8b",
       "llama-3.1-8b", "mistral-7b", "qwen2-7b", "clip-vit-l-14", "clip-vit-l-14-336"]

# Published parameter counts (rounded), a sanity check on the meta-model comparison itself.
APPROX_BILLIONS = {"llava-1.5-7b": 7.06, "llava-1.5-13b": 13.35, "llama-2-7b": 6.74,
                   "vicuna-7b-v1.5": 6.74, "llama-3-8b": 8.03, "llama-3.1-8b": 8.03,
                   "mistral-7b": 7.24, "qwen2-7b": 7.62, "clip-vit-l-14": 0.303,
                   "clip-vit-l-14-336": 0.304}


def hf_meta_model(cfg):
    """The transformers model for our config, built on the meta device (no memory)."""
    d = hf_config.to_hf(cfg)
    with torch.device("meta"):
        if cfg.model_type == "llava":
            return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**d))
        if cfg.model_type == "clip_vision":
            return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**d))
        config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        return transformers.AutoModelForCausalLM.from_config(config)


def hf_shapes(torch_model, cfg):
    """{published-checkpoint key: shape} of a transformers model's parameters."""
    tied = cfg.get("text") is not None and cfg.text.tie_word_embeddings
    out = {}
    for k, v in torch_model.state_dict().items():
        if any(re.search(p, k) for p in hf_keys.IGNORED_KEYS):
            continue
        k = hf_keys.canonical_key(k, cfg.model_type)
        if tied and k.endswith("lm_head.weight"):
            continue
        out[k] = tuple(v.shape)
    return out


@functools.lru_cache(maxsize=None)
def inspect(name, scan_layers=False):
    """(model, flat abstract params, {hf key: shape}) of a preset; tracing a 7B model takes
    seconds, so each preset is traced once per session."""
    cfg = presets.get(name)
    cfg.scan_layers = scan_layers
    model = mllm_jax.build_model(cfg)
    expected, flat = hf_io._expected(model)  # runs jax.eval_shape(model.init, ...)
    return model, flat, {k: tuple(shape) for k, (_, _, shape) in expected.items()}


def count(flat):
    return sum(int(np.prod(leaf.shape)) for leaf in flat.values())


@pytest.mark.parametrize("name", BIG)
def test_big_presets_match_transformers_meta_models(name):
    model, flat, ours = inspect(name)
    n_ours = count(flat)
    torch_model = hf_meta_model(model.cfg)
    n_hf = sum(p.numel() for p in torch_model.parameters())
    assert n_ours == n_hf
    assert abs(n_ours / 1e9 - APPROX_BILLIONS[name]) < 0.01 * APPROX_BILLIONS[name], n_ours
    theirs = hf_shapes(torch_model, model.cfg)
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llama-3-8b", "clip-vit-l-14-336"])
def test_scanned_presets_have_the_same_tensors(name):
    _, flat, shapes = inspect(name)
    _, scanned_flat, scanned_shapes = inspect(name, scan_layers=True)
    assert any("layers" in path for path in scanned_flat)
    assert scanned_shapes == shapes
    assert count(scanned_flat) == count(flat)


# Runs in a fresh process so that its peak resident memory is its own.
_NO_ALLOCATION = r"""
import json, resource, time
import jax
import mllm_jax

def rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def live():
    arrays = jax.live_arrays()
    return len(arrays), sum(a.nbytes for a in arrays)

model = mllm_jax.build_model(mllm_jax.presets.get("llava-1.5-13b"))
mllm_jax.abstract_params(mllm_jax.build_model(mllm_jax.presets.get("tiny-llava")))  # warm up
before_live, before_rss = live(), rss_peak_mb()
t = time.perf_counter()
params = mllm_jax.abstract_params(model)
seconds = time.perf_counter() - t
leaves = jax.tree.leaves(params)
print(json.dumps({
    "seconds": seconds, "rss_growth_mb": rss_peak_mb() - before_rss,
    "live_before": before_live, "live_after": live(),
    "all_abstract": all(type(l) is jax.ShapeDtypeStruct for l in leaves),
    "n_params": sum(int(__import__("numpy").prod(l.shape)) for l in leaves)}))
"""


def test_eval_shape_of_llava_13b_allocates_nothing():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _NO_ALLOCATION], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["all_abstract"]
    assert r["n_params"] > 13e9  # 13.35B parameters: 53 GB in float32, more than this machine
    assert r["live_after"] == r["live_before"]  # no device buffer was created
    assert r["rss_growth_mb"] < 512, r  # tracing costs some host memory; the weights would be GBs
    assert r["seconds"] < 60, r
    assert time.perf_counter() - t < 240


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError) as e:
        presets.get("llava-9000")
    msg = str(e.value)
    assert "llava-9000" in msg
    for name in presets.names():
        assert name in msg


def test_names_include_the_documented_presets():
    assert set(BIG) | {"tiny-llava", "tiny-llama", "tiny-clip"} <= set(presets.names())
    assert presets.names() == sorted(presets.names())


def test_get_returns_a_fresh_config():
    a = presets.get("llava-1.5-7b")
    a.text.vocab_size = 7
    a.scan_layers = True
    b = presets.get("llava-1.5-7b")
    assert b.text.vocab_size == 32064 and b.scan_layers is False


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_builds_and_inits_abstractly(name):
    model, flat, shapes = inspect(name)
    cfg = model.cfg
    leaves = list(flat.values())
    assert leaves and all(type(l) is jax.ShapeDtypeStruct for l in leaves)
    assert {l.dtype for l in leaves} == {np.dtype(cfg.param_dtype)}
    # Every parameter has its own HF name, and save_hf's config reads back as the same model.
    assert len(shapes) == len(leaves)
    back = hf_config.from_hf(json.loads(json.dumps(hf_config.to_hf(cfg))))
    assert _architecture(back) == _architecture(cfg)


def _architecture(cfg):
    """A config minus the token ids (which are tokenizer facts, not model shape)."""
    d = cfg.to_dict()
    for section in (d.get("text") or {},):
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            section.pop(k, None)
    return d


# Presets mirror the published checkpoints' config.json files.
PUBLISHED = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llama-2-7b": "meta-llama/Llama-2-7b-hf",
             "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "mistral-7b": "mistralai/Mistral-7B-v0.1",
             "qwen2-7b": "Qwen/Qwen2-7B"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_equal_published_configs(name):
    published = hf_config.from_hf(json.loads(json.dumps(HUB_CONFIGS[PUBLISHED[name]])))
    assert _architecture(presets.get(name)) == _architecture(published)
