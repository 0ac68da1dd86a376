"""HF checkpoints in and out: round trips through transformers' own classes, sharding, bf16,
lazy reading, clear errors on bad input, and config.json parsing against transformers."""
import collections
import re
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from safetensors import safe_open
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import hf_factories as hf
import mllm_jax
from mllm_jax.convert import hf_config, hf_keys, safetensors_io
from mllm_jax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFile
from mllm_jax.models import rope
from mllm_jax.models import llava as llava_family
from mllm_jax.models.decoders import llama as llama_decoder
from mllm_jax.models.encoders import clip as clip_encoder

# ---- tiny HF checkpoints -------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# kind -> (builder, transformers class, our model_type)
KINDS = {
    "llava": (lambda: hf.build_llava(), transformers.LlavaForConditionalGeneration, "llava"),
    # transformers 5 writes text_config.tie_word_embeddings=false and ties on the top-level flag.
    "llava_tied": (lambda: hf.build_llava(tie_word_embeddings=True),
                   transformers.LlavaForConditionalGeneration, "llava"),
    "llama": (lambda: hf.build_llama(), transformers.LlamaForCausalLM, "causal_lm"),
    "llama_tied": (lambda: hf.build_llama(tie_word_embeddings=True),
                   transformers.LlamaForCausalLM, "causal_lm"),
    "llama3_rope": (lambda: hf.build_llama(rope_parameters=dict(LLAMA3_ROPE)),
                    transformers.LlamaForCausalLM, "causal_lm"),
    "qwen2": (lambda: hf.build_qwen2(), transformers.Qwen2ForCausalLM, "causal_lm"),
    "mistral": (lambda: hf.build_mistral(sliding_window=4), transformers.MistralForCausalLM,
                "causal_lm"),
    "clip_vision": (lambda: hf.build_clip_vision(), transformers.CLIPVisionModel,
                    "clip_vision"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (directory saved by save_pretrained, the torch model it holds); built lazily."""
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(kind):
        if kind not in cache:
            model = KINDS[kind][0]()
            cache[kind] = (hf.save(model, root / kind), model)
        return cache[kind]
    return get


def hf_inputs(model):
    """Deterministic inputs for a torch model (llava: one image and its image tokens)."""
    cfg = model.config
    rng = np.random.RandomState(0)
    if isinstance(model, transformers.CLIPVisionModel):
        _, pixels = hf.random_pixels(2, cfg.image_size)
        return {"pixel_values": pixels}
    if isinstance(model, transformers.LlavaForConditionalGeneration):
        text = cfg.text_config
        ids = rng.randint(3, text.vocab_size - 1, size=(1, 8 + cfg.image_seq_length))
        ids[0, 0] = text.bos_token_id
        ids[0, 2:2 + cfg.image_seq_length] = cfg.image_token_index
        _, pixels = hf.random_pixels(1, cfg.vision_config.image_size)
        return {"input_ids": torch.from_numpy(ids), "pixel_values": pixels}
    ids = rng.randint(3, cfg.vocab_size, size=(2, 9))
    return {"input_ids": torch.from_numpy(ids)}


@torch.no_grad()
def hf_outputs(model):
    out = model(**hf_inputs(model))
    if isinstance(model, transformers.CLIPVisionModel):
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    return {"logits": out.logits}


def assert_outputs_close(got, want, atol=0.0):
    assert got.keys() == want.keys()
    for k in want:
        diff = (got[k].float() - want[k].float()).abs().max().item()
        assert diff <= atol, f"{k}: max abs diff {diff}"


def read_tensors(directory):
    """{key: torch tensor} of every safetensors file in `directory`, read with the safetensors
    library (independent of our reader)."""
    out = {}
    for fname in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            for k in f.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = f.get_tensor(k)
    return out


def canonical(tensors, model_type):
    """Tensors keyed by their published-checkpoint names, buffers dropped."""
    out = {}
    for k, v in tensors.items():
        if any(re.search(p, k) for p in hf_keys.IGNORED_KEYS):
            continue
        c = hf_keys.canonical_key(k, model_type)
        assert c not in out, f"{k} and another key both canonicalize to {c}"
        out[c] = v
    return out


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b), (f"only in first: {sorted(set(a) - set(b))}; "
                                    f"only in second: {sorted(set(b) - set(a))}")
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        assert torch.equal(x.contiguous().reshape(-1).view(torch.uint8),
                           y.contiguous().reshape(-1).view(torch.uint8)), f"{k} differs"


def assert_params_bitwise_equal(p, q):
    fp, fq = (jax.tree_util.tree_flatten_with_path(t) for t in (p, q))
    assert jax.tree.structure(p) == jax.tree.structure(q)
    for (path, x), (_, y) in zip(fp[0], fq[0]):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def load_with_transformers(cls, directory, **kw):
    model, info = cls.from_pretrained(directory, output_loading_info=True, **kw)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


# ---- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_through_transformers(checkpoints, tmp_path, kind, scan_layers):
    src, original = checkpoints(kind)
    _, cls, model_type = KINDS[kind]
    model, params = mllm_jax.load_hf(src, scan_layers=scan_layers)
    assert model.cfg.model_type == model_type and model.cfg.scan_layers == scan_layers
    out = mllm_jax.save_hf(model, params, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE]

    # Every tensor bitwise equal under the published-checkpoint names.
    assert_bitwise_equal(canonical(read_tensors(out), model_type),
                         canonical(read_tensors(src), model_type))
    # Our exporter writes the canonical layout itself, not just something that maps to it.
    assert all(hf_keys.canonical_key(k, model_type) == k for k in read_tensors(out))

    reloaded = load_with_transformers(cls, out)
    assert type(reloaded) is type(original)
    assert_outputs_close(hf_outputs(reloaded), hf_outputs(original))


def test_exported_config_matches_the_original(checkpoints, tmp_path):
    """The config transformers reads back from our export equals the original's, field by
    field, for the fields that decide the computation."""
    for kind in ("llava", "llava_tied", "llama3_rope", "mistral", "qwen2", "clip_vision"):
        src, original = checkpoints(kind)
        model, params = mllm_jax.load_hf(src)
        out = mllm_jax.save_hf(model, params, tmp_path / kind)
        got = type(original.config).from_pretrained(out)
        compare_configs(got, original.config)


# ---- sharded checkpoints -------------------------------------------------------------------

def test_save_hf_shards_and_load_hf_reads_them(checkpoints, tmp_path):
    src, original = checkpoints("llava")
    model, params = mllm_jax.load_hf(src)
    max_shard = 40_000
    out = mllm_jax.save_hf(model, params, tmp_path / "sharded", max_shard_size=max_shard)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not os.path.exists(os.path.join(out, SINGLE_FILE))
    with open(os.path.join(out, INDEX_FILE)) as f:
        index = json.load(f)
    tensors = read_tensors(out)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    for fname in files:
        with safe_open(os.path.join(out, fname), framework="pt") as f:
            keys = list(f.keys())
            nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        assert set(keys) == {k for k, v in index["weight_map"].items() if v == fname}
        # A shard stays under the limit unless it holds one tensor that alone exceeds it.
        assert nbytes <= max_shard or len(keys) == 1, (fname, nbytes, keys)

    model2, params2 = mllm_jax.load_hf(out)
    assert model2.cfg.to_dict() == model.cfg.to_dict()
    assert_params_bitwise_equal(params2, params)
    reloaded = load_with_transformers(transformers.LlavaForConditionalGeneration, out)
    assert_outputs_close(hf_outputs(reloaded), hf_outputs(original))


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_load_hf_reads_checkpoints_sharded_by_transformers(checkpoints, tmp_path, kind):
    src, original = checkpoints(kind)
    sharded = tmp_path / "hf_sharded"
    original.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(sharded / INDEX_FILE)
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    _, want = mllm_jax.load_hf(src)
    _, got = mllm_jax.load_hf(sharded)
    assert_params_bitwise_equal(got, want)
    _, got_scanned = mllm_jax.load_hf(sharded, scan_layers=True)
    _, want_scanned = mllm_jax.load_hf(src, scan_layers=True)
    assert_params_bitwise_equal(got_scanned, want_scanned)


# ---- dtypes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    model = hf.build_llama().to(torch.bfloat16)
    return hf.save(model, tmp_path_factory.mktemp("bf16") / "llama"), model


def test_bf16_checkpoint_keeps_its_dtype_and_round_trips(bf16_checkpoint, tmp_path):
    src, _ = bf16_checkpoint
    assert {t.dtype for t in read_tensors(src).values()} == {torch.bfloat16}
    model, params = mllm_jax.load_hf(src)
    assert model.cfg.param_dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    out = mllm_jax.save_hf(model, params, tmp_path / "export")
    exported = read_tensors(out)
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert_bitwise_equal(exported, read_tensors(src))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    reloaded = load_with_transformers(transformers.LlamaForCausalLM, out)
    assert reloaded.dtype == torch.bfloat16
    # The reference is transformers' own load of the source: `original.to(bfloat16)` also cast
    # the float32 rotary buffer, which a load from disk does not.
    reference = load_with_transformers(transformers.LlamaForCausalLM, src)
    assert_outputs_close(hf_outputs(reloaded), hf_outputs(reference))


def test_load_hf_casts_to_the_requested_dtype(bf16_checkpoint, tmp_path):
    src, _ = bf16_checkpoint
    _, bf16 = mllm_jax.load_hf(src)
    model, f32 = mllm_jax.load_hf(src, dtype="float32")
    assert model.cfg.param_dtype == "float32"
    assert {leaf.dtype for leaf in jax.tree.leaves(f32)} == {np.dtype(np.float32)}
    assert_params_bitwise_equal(f32, jax.tree.map(lambda x: np.asarray(x, np.float32), bf16))
    # And save_hf can write a dtype other than the params'.
    out = mllm_jax.save_hf(model, f32, tmp_path / "export", dtype="bfloat16")
    assert_bitwise_equal(read_tensors(out), read_tensors(src))


# ---- lazy reading --------------------------------------------------------------------------

@pytest.fixture
def read_spy(monkeypatch):
    """Counts SafetensorsFile.get per key; records whether each result is a view of a memory
    map; makes every whole-file loader fail."""
    reads = collections.Counter()
    mapped = []
    real_get = SafetensorsFile.get

    def get(self, key):
        arr = real_get(self, key)
        reads[key] += 1
        base = arr
        while base is not None and not isinstance(base, np.memmap):
            base = getattr(base, "base", None)
        mapped.append(isinstance(base, np.memmap))
        return arr

    def forbidden(name):
        def fail(*a, **k):
            raise AssertionError(f"{name} was called while loading a checkpoint")
        return fail

    monkeypatch.setattr(SafetensorsFile, "get", get)
    for mod, name in [(np, "load"), (np, "fromfile"), (torch, "load"),
                      (safetensors.numpy, "load_file"), (safetensors.numpy, "load"),
                      (safetensors.torch, "load_file"), (safetensors.torch, "load"),
                      (safetensors_io.np, "fromfile")]:
        monkeypatch.setattr(mod, name, forbidden(f"{mod.__name__}.{name}"))
    return reads, mapped


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_load_hf_reads_each_tensor_once_from_a_memory_map(checkpoints, tmp_path, read_spy,
                                                          scan_layers, sharded):
    src, original = checkpoints("llava")
    keys = list(read_tensors(src))  # safe_open is not one of the forbidden loaders
    if sharded:
        src = tmp_path / "sharded"
        original.save_pretrained(src, max_shard_size="20KB")
    reads, mapped = read_spy
    mllm_jax.load_hf(src, scan_layers=scan_layers)
    assert sorted(reads) == sorted(keys)
    assert set(reads.values()) == {1}, {k: n for k, n in reads.items() if n != 1}
    assert mapped and all(mapped)


# ---- bad input -----------------------------------------------------------------------------

@pytest.fixture
def bad_dir(checkpoints, tmp_path):
    """A fresh copy of the tiny llama checkpoint to break."""
    src, _ = checkpoints("llama")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def get_spy(monkeypatch):
    calls = []
    real_get = SafetensorsFile.get

    def get(self, key):
        calls.append(key)
        return real_get(self, key)
    monkeypatch.setattr(SafetensorsFile, "get", get)
    return calls


def _rewrite(directory, edit):
    path = os.path.join(directory, SINGLE_FILE)
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_missing_tensor_is_named_and_nothing_is_read(bad_dir, get_spy):
    _rewrite(bad_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(mllm_jax.CheckpointMismatchError) as e:
        mllm_jax.load_hf(bad_dir)
    msg = str(e.value)
    assert "missing tensors (1)" in msg and "model.layers.1.mlp.down_proj.weight" in msg
    assert str(bad_dir) in msg and "nothing was loaded" in msg
    assert get_spy == []


def test_unexpected_tensor_is_named_and_nothing_is_read(bad_dir, get_spy):
    _rewrite(bad_dir, lambda t: t.update(
        {"model.layers.0.self_attn.extra_proj.weight": np.zeros((4, 4), np.float32)}))
    with pytest.raises(mllm_jax.CheckpointMismatchError) as e:
        mllm_jax.load_hf(bad_dir, scan_layers=True)
    msg = str(e.value)
    assert "unexpected tensors (1)" in msg and "model.layers.0.self_attn.extra_proj.weight" in msg
    assert "missing" not in msg
    assert get_spy == []


def test_shape_mismatch_names_tensor_file_and_shapes(bad_dir, get_spy):
    _edit_config(bad_dir, intermediate_size=96)  # the checkpoint holds 128
    with pytest.raises(mllm_jax.CheckpointMismatchError) as e:
        mllm_jax.load_hf(bad_dir)
    msg = str(e.value)
    assert "shape mismatches (6)" in msg  # gate/up/down x 2 layers
    assert ("model.layers.0.mlp.gate_proj.weight (model.safetensors): checkpoint [128, 64], "
            "model expects [96, 64]") in msg
    assert "model.layers.1.mlp.down_proj.weight" in msg
    assert get_spy == []


def test_unsupported_model_type(bad_dir, get_spy):
    _edit_config(bad_dir, model_type="gpt2")
    with pytest.raises(mllm_jax.UnsupportedModelError) as e:
        mllm_jax.load_hf(bad_dir)
    msg = str(e.value)
    assert "'gpt2'" in msg and "config.json" in msg and "llava" in msg and "llama" in msg
    assert get_spy == []


def test_unsupported_rope_type(bad_dir, get_spy):
    _edit_config(bad_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                           "factor": 4.0})
    with pytest.raises(mllm_jax.UnsupportedModelError) as e:
        mllm_jax.load_hf(bad_dir)
    assert "'yarn'" in str(e.value) and "config.json" in str(e.value)
    assert get_spy == []


def test_directory_without_config(bad_dir, get_spy):
    os.remove(bad_dir / "config.json")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        mllm_jax.load_hf(bad_dir)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        mllm_jax.load_hf(bad_dir / "nope")
    assert get_spy == []


def test_directory_without_safetensors(bad_dir, get_spy):
    os.remove(bad_dir / SINGLE_FILE)
    with pytest.raises(FileNotFoundError) as e:
        mllm_jax.load_hf(bad_dir)
    assert str(bad_dir) in str(e.value) and SINGLE_FILE in str(e.value)
    assert INDEX_FILE in str(e.value)
    assert get_spy == []


def test_index_naming_a_missing_shard(checkpoints, tmp_path, get_spy):
    _, original = checkpoints("llama")
    d = tmp_path / "sharded"
    original.save_pretrained(d, max_shard_size="20KB")
    with open(d / INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    victim = weight_map["model.layers.1.mlp.up_proj.weight"]
    os.remove(d / victim)
    with pytest.raises(FileNotFoundError) as e:
        mllm_jax.load_hf(d)
    assert victim in str(e.value) and INDEX_FILE in str(e.value)
    assert get_spy == []


# ---- a full CLIP checkpoint as a vision tower ----------------------------------------------

def test_full_clip_checkpoint_loads_as_vision_model(tmp_path):
    torch.manual_seed(0)
    clip_cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16),
        vision_config={k: v for k, v in hf.VISION_DEFAULTS.items()}, projection_dim=24)
    clip = hf.randomize_extras_(transformers.CLIPModel(clip_cfg).eval())
    clip.save_pretrained(tmp_path / "clip")
    stored = read_tensors(tmp_path / "clip")
    assert any(k.startswith("text_model.") for k in stored) and "logit_scale" in stored

    model, params = mllm_jax.load_hf(tmp_path / "clip")
    assert model.cfg.model_type == "clip_vision"
    assert set(params) == {"vision_model"}

    vision = transformers.CLIPVisionModel(clip.config.vision_config).eval()
    vision.load_state_dict(clip.vision_model.state_dict())
    nhwc, nchw = hf.random_pixels(2, clip_cfg.vision_config.image_size)
    with torch.no_grad():
        want = vision(pixel_values=nchw, output_hidden_states=True)
    got = model.apply({"params": params}, nhwc)
    assert len(got["hidden_states"]) == len(want.hidden_states)
    for g, w in zip(got["hidden_states"], want.hidden_states):
        np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["last_hidden_state"]),
                               want.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["pooler_output"]), want.pooler_output.numpy(),
                               atol=1e-5, rtol=1e-5)

    # Exported, it is a CLIPVisionModel checkpoint (text parts dropped) transformers loads.
    out = mllm_jax.save_hf(model, params, tmp_path / "export")
    reloaded = load_with_transformers(transformers.CLIPVisionModel, out)
    with torch.no_grad():
        again = reloaded(pixel_values=nchw)
    assert torch.equal(again.last_hidden_state, want.last_hidden_state)


# ---- config.json parsing against transformers -----------------------------------------------

TEXT_CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                "qwen2": transformers.Qwen2Config}


def _hf_rope(c):
    params = dict(c.rope_parameters)
    return params.pop("rope_theta"), params


def _hf_inv_freq(c):
    return LlamaRotaryEmbedding(config=c).inv_freq.numpy()


def assert_text_matches(ours, theirs):
    """Our text config computes what transformers' config `theirs` describes."""
    heads = theirs.num_attention_heads
    want = dict(
        model_type=theirs.model_type, vocab_size=theirs.vocab_size,
        hidden_size=theirs.hidden_size, intermediate_size=theirs.intermediate_size,
        num_hidden_layers=theirs.num_hidden_layers, num_attention_heads=heads,
        num_key_value_heads=theirs.num_key_value_heads or heads,
        head_dim=getattr(theirs, "head_dim", None) or theirs.hidden_size // heads,
        hidden_act=theirs.hidden_act, rms_norm_eps=theirs.rms_norm_eps,
        max_position_embeddings=theirs.max_position_embeddings,
        rope_theta=_hf_rope(theirs)[0],
        sliding_window=getattr(theirs, "sliding_window", None),
        qkv_bias=theirs.model_type == "qwen2" or getattr(theirs, "attention_bias", False),
        o_bias=getattr(theirs, "attention_bias", False),
        mlp_bias=getattr(theirs, "mlp_bias", False),
    )
    got = {k: ours[k] for k in want}
    assert got == want
    # Same frequencies up to float32 rounding of pow (numpy's and torch's differ by an ulp).
    np.testing.assert_allclose(
        rope.inverse_frequencies(ours.head_dim, ours.rope_theta,
                                 ours.rope_scaling and dict(ours.rope_scaling)),
        _hf_inv_freq(theirs), rtol=3e-7, atol=0)


VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")


def assert_vision_matches(ours, theirs):
    assert {k: ours[k] for k in VISION_FIELDS} == {k: getattr(theirs, k) for k in VISION_FIELDS}


def assert_llava_matches(ours, theirs):
    assert_text_matches(ours.text, theirs.text_config)
    assert_vision_matches(ours.vision, theirs.vision_config)
    assert ours.image_token_index == theirs.image_token_index
    assert ours.vision_feature_layer == theirs.vision_feature_layer
    assert ours.vision_feature_select_strategy == theirs.vision_feature_select_strategy
    assert ours.image_seq_length == theirs.image_seq_length
    assert ours.projector.hidden_act == theirs.projector_hidden_act
    assert ours.projector.bias == theirs.multimodal_projector_bias
    assert ours.text.tie_word_embeddings == theirs.tie_word_embeddings


def compare_configs(theirs_a, theirs_b):
    """Two transformers configs describe the same computation (via our parsing of each)."""
    a = hf_config.from_hf(theirs_a.to_dict())
    b = hf_config.from_hf(theirs_b.to_dict())
    for c in (a, b):  # runtime fields are ours, not the checkpoint's
        c.param_dtype = c.dtype = "float32"
    assert a.to_dict() == b.to_dict()
    if theirs_a.model_type == "llava":
        assert_llava_matches(a, theirs_b)
    elif theirs_a.model_type == "clip_vision_model":
        assert_vision_matches(a.vision, theirs_b)
    else:
        assert_text_matches(a.text, theirs_b)


@pytest.mark.parametrize("model_type", sorted(TEXT_CONFIGS))
def test_text_defaults_are_transformers_defaults(model_type):
    theirs = TEXT_CONFIGS[model_type]()
    for k, v in llama_decoder.TEXT_DEFAULTS[model_type].items():
        want = _hf_rope(theirs)[0] if k == "rope_theta" else getattr(theirs, k, None)
        assert v == want, (k, v, want)
    # And a config.json with nothing but the model type parses to transformers' defaults.
    assert_text_matches(llama_decoder.text_from_hf({"model_type": model_type}), theirs)


def test_vision_defaults_are_transformers_defaults():
    theirs = transformers.CLIPVisionConfig()
    defaults = clip_encoder.VISION_DEFAULTS
    assert defaults == {k: getattr(theirs, k) for k in defaults}
    assert_vision_matches(clip_encoder.vision_from_hf({}), theirs)
    llava_vision = transformers.LlavaConfig().vision_config
    for k, v in llava_family.LLAVA_VISION_DEFAULTS.items():
        assert v == getattr(llava_vision, k), k
    assert_llava_matches(hf_config.from_hf({"model_type": "llava"}), transformers.LlavaConfig())


# config.json files as published on the hub (sparse: HF writes only non-default fields).
HUB_CONFIGS = {
    "llava-hf/llava-1.5-7b-hf": {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
        "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5",
                        "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                        "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                        "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                          "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": 32064},
    # A partial vision_config is completed with CLIPVisionConfig's defaults (patch 32),
    # not LlavaConfig's default tower; a top-level tie flag ties the LLM.
    "llava-partial-vision": {
        "model_type": "llava",
        "vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "image_size": 320},
        "text_config": {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
                        "num_key_value_heads": 2, "intermediate_size": 4864,
                        "num_hidden_layers": 24, "vocab_size": 152000},
        "tie_word_embeddings": True, "vision_feature_layer": [-2, -5]},
    "llava-empty-vision": {"model_type": "llava", "vision_config": {}},
    "llava-top-level-tie": {
        "model_type": "llava", "tie_word_embeddings": True,
        "text_config": {"model_type": "llama", "tie_word_embeddings": False, "hidden_size": 64,
                        "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128}},
    "meta-llama/Llama-2-7b-hf": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000},
    "meta-llama/Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
    "Qwen/Qwen2-7B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
        "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 152064},
    "clip-vision-sparse": {"model_type": "clip_vision_model", "hidden_size": 64,
                           "num_attention_heads": 4},
}
HUB_CLASSES = {"llava": transformers.LlavaConfig,
               "clip_vision_model": transformers.CLIPVisionConfig, **TEXT_CONFIGS}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_sparse_hub_configs_parse_like_transformers(name):
    d = json.loads(json.dumps(HUB_CONFIGS[name]))
    theirs = HUB_CLASSES[d["model_type"]](**json.loads(json.dumps(d)))
    ours = hf_config.from_hf(d)
    if d["model_type"] == "llava":
        assert_llava_matches(ours, theirs)
    elif d["model_type"] == "clip_vision_model":
        assert_vision_matches(ours.vision, theirs)
    else:
        assert_text_matches(ours.text, theirs)
        assert ours.text.tie_word_embeddings == theirs.tie_word_embeddings


def test_clip_config_vision_part_parses_like_transformers():
    d = {"model_type": "clip", "projection_dim": 768,
         "text_config": {"hidden_size": 768, "intermediate_size": 3072,
                         "num_attention_heads": 12, "projection_dim": 768},
         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                           "num_attention_heads": 16, "num_hidden_layers": 24,
                           "patch_size": 14, "projection_dim": 768}}
    ours = hf_config.from_hf(json.loads(json.dumps(d)))
    assert ours.model_type == "clip_vision"
    assert_vision_matches(ours.vision, transformers.CLIPConfig(**d).vision_config)


ROPE_CASES = {
    "v4-theta-only": {"rope_theta": 1000000.0},
    "v4-null-scaling": {"rope_theta": 500000.0, "rope_scaling": None},
    "v4-type-linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "v4-rope_type-llama3": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}},
    "v4-type-default": {"rope_theta": 20000.0, "rope_scaling": {"type": "default"}},
    "v5-default": {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "v5-linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                      "factor": 4.0}},
    "v5-llama3": {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


@pytest.mark.parametrize("name", sorted(ROPE_CASES))
def test_rope_fields_v4_and_v5_parse(name):
    d = {"model_type": "llama", "max_position_embeddings": 131072, **ROPE_CASES[name]}
    theirs = transformers.LlamaConfig(**json.loads(json.dumps(d)))
    ours = llama_decoder.text_from_hf(d)
    theta, params = _hf_rope(theirs)
    assert ours.rope_theta == theta
    if params["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        assert ours.rope_scaling.get("rope_type", ours.rope_scaling.get("type")) == \
            params["rope_type"]
    assert_text_matches(ours, theirs)
    # What we write back (v4 spelling) transformers reads as the same rope.
    again = transformers.LlamaConfig(**llama_decoder.text_to_hf(ours))
    assert _hf_rope(again)[0] == theta
    np.testing.assert_array_equal(_hf_inv_freq(again), _hf_inv_freq(theirs))
