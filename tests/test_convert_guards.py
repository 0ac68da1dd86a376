"""HF checkpoints as untrusted input, and exports that never mix: `convert` refuses a
non-empty destination (or replaces it whole); shard indexes stay inside their directory;
safetensors headers, config.json values and the weights themselves are checked, each error
naming the file and the tensor or field."""
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import transformers

import hf_factories as hf
import mllm_jax
from mllm_jax.cli import main
from mllm_jax.convert import (NonFiniteWeightsError, SafetensorsError, hf_config, load_hf,
                              load_orbax, safetensors_io, save_hf, save_orbax)
from mllm_jax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE
from mllm_jax.models.registry import InvalidConfigError


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf.make_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def two_orbax(llama_dir, tmp_path_factory):
    """Two orbax checkpoints of the tiny llama with different weights, and their params."""
    root = tmp_path_factory.mktemp("orbax")
    model, params = load_hf(llama_dir)
    halved = jax.tree.map(lambda x: x * 0.5, params)
    save_orbax(model, params, root / "first")
    save_orbax(model, halved, root / "second")
    return (str(root / "first"), params), (str(root / "second"), halved)


def embeddings(params):
    return np.asarray(params["model"]["embed_tokens"]["embedding"])


def leftovers(directory):
    """Temporary siblings an interrupted or finished write left beside `directory`."""
    parent, base = os.path.split(os.path.abspath(directory))
    return [n for n in os.listdir(parent) if n.startswith(f".{base}.")]


# ---- exports never mix -------------------------------------------------------------------

def test_orbax_to_hf_refuses_a_non_empty_destination_and_overwrite_replaces_it_whole(
        two_orbax, tmp_path, capsys):
    (first, first_params), (second, second_params) = two_orbax
    out = tmp_path / "export"
    assert main(["convert", "orbax-to-hf", first, str(out), "--max-shard-size", "20KB"]) == 0
    before = sorted(os.listdir(out))
    assert INDEX_FILE in before and len(before) > 3
    capsys.readouterr()

    # Another shard size and other weights into the same directory: refused, nothing touched.
    assert main(["convert", "orbax-to-hf", second, str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out} exists and is not empty" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(out)) == before
    np.testing.assert_array_equal(embeddings(load_hf(out)[1]), embeddings(first_params))

    # --overwrite: only the new export's files remain, and both readers see the new weights.
    assert main(["convert", "orbax-to-hf", second, str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE]
    assert leftovers(out) == []
    np.testing.assert_array_equal(embeddings(load_hf(out)[1]), embeddings(second_params))
    torch_model = transformers.LlamaForCausalLM.from_pretrained(out)
    np.testing.assert_array_equal(torch_model.model.embed_tokens.weight.detach().numpy(),
                                  embeddings(second_params))


def test_a_failed_overwrite_leaves_the_earlier_export_intact(two_orbax, tmp_path,
                                                             monkeypatch):
    (first, first_params), (second, _) = two_orbax
    out = tmp_path / "export"
    assert main(["convert", "orbax-to-hf", first, str(out), "--max-shard-size", "20KB"]) == 0
    before = sorted(os.listdir(out))
    real_write = safetensors_io.write_file
    written = []

    def disk_full_after_two_shards(path, tensors, metadata=None):
        if len(written) == 2:
            raise OSError(28, "No space left on device", path)
        written.append(path)
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(safetensors_io, "write_file", disk_full_after_two_shards)
    with pytest.raises(OSError, match="No space left"):
        main(["convert", "orbax-to-hf", second, str(out), "--overwrite",
              "--max-shard-size", "10KB"])
    assert len(written) == 2
    assert sorted(os.listdir(out)) == before
    assert leftovers(out) == []
    np.testing.assert_array_equal(embeddings(load_hf(out)[1]), embeddings(first_params))


def test_hf_to_orbax_refuses_a_non_empty_destination_and_overwrite_replaces_it_whole(
        llama_dir, tmp_path, capsys):
    dst = tmp_path / "orbax"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert main(["convert", "hf-to-orbax", llama_dir, str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"{dst} exists and is not empty" in err and "--overwrite" in err
    assert (dst / "notes.txt").read_text() == "mine"

    assert main(["convert", "hf-to-orbax", llama_dir, str(dst), "--overwrite"]) == 0
    assert "notes.txt" not in os.listdir(dst)
    assert {"model_config.json", "params"} <= set(os.listdir(dst))
    assert leftovers(dst) == []
    _, params = load_orbax(dst)
    np.testing.assert_array_equal(embeddings(params), embeddings(load_hf(llama_dir)[1]))


def test_overwrite_never_deletes_the_source(llama_dir, tmp_path, capsys):
    src = tmp_path / "ckpt"
    shutil.copytree(llama_dir, src)
    for dst in (src, tmp_path):  # the source itself, and a directory holding it
        assert main(["convert", "hf-to-orbax", str(src), str(dst), "--overwrite"]) == 1
        assert "replacing it would delete the source" in capsys.readouterr().err
    assert sorted(os.listdir(src)) == sorted(os.listdir(llama_dir))


def test_save_hf_refuses_an_earlier_export_but_keeps_other_files(llama_dir, tmp_path):
    model, params = load_hf(llama_dir)
    out = tmp_path / "export"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # a tokenizer first is fine
    save_hf(model, params, out, max_shard_size=20_000)
    assert (out / INDEX_FILE).exists() and (out / "tokenizer.json").read_text() == "{}"
    before = sorted(os.listdir(out))

    halved = jax.tree.map(lambda x: x * 0.5, params)
    with pytest.raises(FileExistsError) as e:
        save_hf(model, halved, out)
    assert str(out) in str(e.value) and "overwrite=True" in str(e.value)
    assert "config.json" in str(e.value)
    assert sorted(os.listdir(out)) == before

    save_hf(model, halved, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE]
    np.testing.assert_array_equal(embeddings(load_hf(out)[1]), embeddings(halved))
    assert leftovers(out) == []


# ---- shard indexes stay inside their directory -------------------------------------------

def sharded_copy(llama_dir, path):
    """The tiny llama as a two-file checkpoint with an index (norm weight in the second)."""
    os.makedirs(path)
    tensors = safetensors.numpy.load_file(os.path.join(llama_dir, SINGLE_FILE))
    norm = {"model.norm.weight": tensors.pop("model.norm.weight")}
    safetensors.numpy.save_file(tensors, os.path.join(path, "a.safetensors"))
    safetensors.numpy.save_file(norm, os.path.join(path, "b.safetensors"))
    shutil.copy(os.path.join(llama_dir, "config.json"), path)
    weight_map = {**{k: "a.safetensors" for k in tensors}, "model.norm.weight": "b.safetensors"}
    write_index(path, weight_map)
    return weight_map


def write_index(path, weight_map):
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("target", ["../elsewhere.safetensors", "/etc/passwd",
                                    "sub/../../elsewhere.safetensors"])
def test_index_entries_outside_the_directory_are_refused(llama_dir, tmp_path, target):
    d = tmp_path / "ckpt"
    weight_map = sharded_copy(llama_dir, d)
    assert load_hf(d)[0].cfg.model_type == "causal_lm"  # the honest index loads
    shutil.copy(d / "b.safetensors", tmp_path / "elsewhere.safetensors")
    write_index(d, {**weight_map, "model.norm.weight": target})
    with pytest.raises(SafetensorsError) as e:
        load_hf(d)
    msg = str(e.value)
    assert str(d / INDEX_FILE) in msg and "'model.norm.weight'" in msg and target in msg
    assert "outside the checkpoint directory" in msg


def test_index_through_a_symlinked_directory_is_refused(llama_dir, tmp_path):
    d = tmp_path / "ckpt"
    weight_map = sharded_copy(llama_dir, d)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(d / "b.safetensors", outside / "b.safetensors")
    os.symlink(outside, d / "sub")
    write_index(d, {**weight_map, "model.norm.weight": "sub/b.safetensors"})
    with pytest.raises(SafetensorsError) as e:
        load_hf(d)
    assert str(d / INDEX_FILE) in str(e.value) and "sub/b.safetensors" in str(e.value)
    assert str(outside) in str(e.value)


def test_symlinked_shard_files_load_as_in_the_hub_cache(llama_dir, tmp_path):
    """The hub cache keeps every file of a snapshot as a symlink into its blobs/."""
    d = tmp_path / "snapshot"
    sharded_copy(llama_dir, d)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.move(d / name, blobs / name)
        os.symlink(os.path.join("..", "blobs", name), d / name)
    np.testing.assert_array_equal(embeddings(load_hf(d)[1]),
                                  embeddings(load_hf(llama_dir)[1]))


# ---- safetensors headers -----------------------------------------------------------------

def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        return header, f.read()


def write_raw(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture
def ckpt(llama_dir, tmp_path):
    """A fresh copy of the tiny llama to damage; returns (directory, its safetensors file)."""
    d = tmp_path / "ckpt"
    shutil.copytree(llama_dir, d)
    return d, str(d / SINGLE_FILE)


def edit_header(path, edit):
    header, data = read_header(path)
    edit(header)
    write_raw(path, header, data)


def test_truncated_file_names_the_file_and_the_first_tensor_cut_off(ckpt, capsys):
    d, path = ckpt
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    header, _ = read_header(path)
    with pytest.raises(SafetensorsError) as e:
        load_hf(d)
    msg = str(e.value)
    assert path in msg and "reach past the end of the data" in msg and "truncated" in msg
    assert any(f"'{k}'" in msg for k in header)
    # Cut inside the header itself; and through the command line, without a traceback.
    os.truncate(path, 100)
    assert main(["convert", "hf-to-orbax", str(d), str(d.parent / "out")]) == 1
    err = capsys.readouterr().err
    assert path in err and "header claims" in err and "Traceback" not in err


def test_overlapping_tensors_are_named(ckpt):
    d, path = ckpt
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    edit_header(path, lambda h: h[b].update(data_offsets=list(h[a]["data_offsets"])))
    with pytest.raises(SafetensorsError) as e:
        load_hf(d)
    msg = str(e.value)
    assert path in msg and f"'{a}'" in msg and f"'{b}'" in msg and "share bytes" in msg


def test_mislabelled_dtype_is_named(ckpt):
    """A BF16 span whose header says F32 (with the element count the span would hold)."""
    d, path = ckpt
    tensors = safetensors.numpy.load_file(path)
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key].astype(ml_dtypes.bfloat16)
    safetensors_io.write_file(path, tensors)
    assert load_hf(d, dtype="float32")[0] is not None  # labelled right, it loads
    edit_header(path, lambda h: h[key].update(dtype="F32"))
    with pytest.raises(SafetensorsError) as e:
        load_hf(d, dtype="float32")
    msg = str(e.value)
    assert path in msg and f"'{key}'" in msg and "mislabelled" in msg
    assert "dtype F32" in msg


def test_offsets_past_the_end_and_unknown_dtypes_are_named(ckpt):
    d, path = ckpt
    key = "model.norm.weight"
    _, data = read_header(path)

    def past_end(h):
        start, end = h[key]["data_offsets"]
        h[key]["data_offsets"] = [len(data) + 64, len(data) + 64 + end - start]
    edit_header(path, past_end)
    with pytest.raises(SafetensorsError) as e:
        load_hf(d)
    assert path in str(e.value) and f"'{key}'" in str(e.value)
    assert "past the end of the data" in str(e.value)

    edit_header(path, lambda h: h[key].update(dtype="F31", data_offsets=[0, 4]))
    with pytest.raises(SafetensorsError, match="unknown dtype 'F31'") as e:
        load_hf(d)
    assert path in str(e.value) and f"'{key}'" in str(e.value)


def test_garbage_header_and_header_length_are_named(ckpt):
    d, path = ckpt
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 10 ** 15))
    with pytest.raises(SafetensorsError, match="header claims 1000000000000000 bytes") as e:
        load_hf(d)
    assert path in str(e.value)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 16) + b"{not json at all")
    with pytest.raises(SafetensorsError, match="not valid JSON") as e:
        load_hf(d)
    assert path in str(e.value)


def test_garbage_config_and_index_json_name_the_file(llama_dir, ckpt, tmp_path, capsys):
    d, _ = ckpt
    config = d / "config.json"
    config.write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(ValueError, match="is not valid JSON") as e:
        load_hf(d)
    assert str(config) in str(e.value)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an object") as e:
        load_hf(d)
    assert str(config) in str(e.value)

    s = tmp_path / "sharded"
    sharded_copy(llama_dir, s)
    (s / INDEX_FILE).write_text('{"weight_map": {"model.norm.weight": ')
    assert main(["convert", "hf-to-orbax", str(s), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(s / INDEX_FILE) in err and "not valid JSON" in err and "Traceback" not in err
    (s / INDEX_FILE).write_text('{"weight_map": ["a.safetensors"]}')
    with pytest.raises(SafetensorsError, match="no weight_map") as e:
        load_hf(s)
    assert str(s / INDEX_FILE) in str(e.value)


def test_index_placing_a_tensor_in_a_shard_without_it_is_named(llama_dir, tmp_path):
    d = tmp_path / "sharded"
    weight_map = sharded_copy(llama_dir, d)
    write_index(d, {**weight_map, "model.norm.weight": "a.safetensors"})
    with pytest.raises(SafetensorsError) as e:
        load_hf(d)
    assert str(d / INDEX_FILE) in str(e.value) and "'model.norm.weight'" in str(e.value)
    assert "a.safetensors" in str(e.value)


# ---- config.json values, checked before anything is built ----------------------------------

@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """config.json dicts of the tiny llama and llava, as transformers writes them."""
    root = tmp_path_factory.mktemp("configs")
    hf.text_config().save_pretrained(root / "llama")
    transformers.LlavaConfig(vision_config=hf.vision_config(), text_config=hf.text_config(),
                             image_token_index=127).save_pretrained(root / "llava")
    return {k: json.loads((root / k / "config.json").read_text()) for k in ("llama", "llava")}


def config_only(tmp_path, cfg):
    """A checkpoint directory holding only config.json: a check that passes would go on to
    look for the safetensors files and fail there instead."""
    d = tmp_path / "cfg_only"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_the_unchanged_configs_pass_the_checks(configs, tmp_path):
    for cfg in configs.values():
        with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
            load_hf(config_only(tmp_path, cfg))


def test_a_layer_count_past_the_bound_is_refused_before_anything_is_built(
        configs, tmp_path, capsys, monkeypatch):
    def no_model(cfg):
        raise AssertionError("a model was built from the config")
    monkeypatch.setattr(mllm_jax.convert.hf_io, "build_model", no_model)
    d = config_only(tmp_path, {**configs["llama"], "num_hidden_layers": 200000})
    with pytest.raises(InvalidConfigError) as e:
        load_hf(d)
    msg = str(e.value)
    assert str(d / "config.json") in msg and "num_hidden_layers = 200000" in msg
    assert "1024" in msg
    assert main(["convert", "hf-to-orbax", str(d), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "num_hidden_layers = 200000" in err and "Traceback" not in err


@pytest.mark.parametrize("changes, expected", [
    # head_dim derived from the width: the heads must divide it.
    (dict(num_attention_heads=5, num_key_value_heads=5, head_dim=None),
     "num_attention_heads = 5 does not divide hidden_size = 64"),
    (dict(num_attention_heads=4, num_key_value_heads=3),
     "num_key_value_heads = 3 does not divide num_attention_heads = 4"),
    (dict(num_hidden_layers="2"), "num_hidden_layers = '2' must be a positive integer"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers = 2.0 must be a positive integer"),
    (dict(intermediate_size=True), "intermediate_size = True must be a positive integer"),
    (dict(vocab_size=0), "vocab_size = 0 must be a positive integer"),
    (dict(rms_norm_eps="tiny"), "rms_norm_eps = 'tiny' must be a positive number"),
    (dict(eos_token_id=-1), "eos_token_id = -1 must be a token id"),
])
def test_bad_text_config_values_are_named(configs, tmp_path, changes, expected):
    cfg = {**configs["llama"], **changes}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    d = config_only(tmp_path, cfg)
    with pytest.raises(InvalidConfigError) as e:
        load_hf(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: {expected}")


@pytest.mark.parametrize("section, changes, expected", [
    ("vision_config", dict(patch_size=6), "vision_config: patch_size = 6 does not divide "
                                          "image_size = 28"),
    ("vision_config", dict(num_attention_heads=3), "vision_config: num_attention_heads = 3 "
                                                   "does not divide hidden_size = 32"),
    ("vision_config", dict(num_hidden_layers=5000), "vision_config: num_hidden_layers = 5000 "
                                                    "is more than 1024"),
    ("text_config", dict(num_hidden_layers=-2), "text_config: num_hidden_layers = -2 must be "
                                                "a positive integer"),
    (None, dict(vision_feature_layer=7), "vision_feature_layer = 7 must be a layer of the "
                                         "3-layer vision tower"),
    (None, dict(image_seq_length="16"), "image_seq_length = '16' must be a positive integer"),
])
def test_bad_llava_config_values_name_the_section(configs, tmp_path, section, changes,
                                                  expected):
    cfg = json.loads(json.dumps(configs["llava"]))
    (cfg[section] if section else cfg).update(changes)
    d = config_only(tmp_path, cfg)
    with pytest.raises(InvalidConfigError) as e:
        load_hf(d)
    assert str(e.value).startswith(f"{d / 'config.json'}")
    assert expected in str(e.value)


def test_registry_checks_our_own_configs():
    """The same hooks check a config built in Python (e.g. a preset with overrides)."""
    from mllm_jax import presets
    from mllm_jax.models import registry
    for name in presets.names():
        registry.check_config(presets.get(name), name)
    cfg = presets.get(presets.names()[0])
    section = cfg.text if "text" in cfg else cfg.vision
    section.num_hidden_layers = 5000
    with pytest.raises(InvalidConfigError, match="num_hidden_layers = 5000 is more than 1024"):
        registry.check_config(cfg, "the preset")


def test_hf_config_from_hf_checks_the_mapped_config():
    with pytest.raises(InvalidConfigError, match="^where: num_attention_heads = 0"):
        hf_config.from_hf({"model_type": "llama", "num_attention_heads": 0}, "where")


# ---- weights that are not finite ---------------------------------------------------------

@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory):
    """A tiny LLaVA checkpoint with its tokenizer, whose second decoder layer's q_proj holds
    a NaN and its first layer's up_proj an Inf; plus a POPE file over one picture.
    Returns (directory, {name: stored tensor key}, POPE file)."""
    from PIL import Image

    from mllm_jax.data.tokenizer import load_tokenizer
    from test_templates import make_hf
    root = tmp_path_factory.mktemp("nan")
    tok_dir = make_hf(str(root / "tok"), "bytelevel")
    tok = load_tokenizer(tok_dir)
    d = hf.make_llava(str(root / "model"), text_overrides=dict(vocab_size=1024),
                      image_token_index=tok.image_token_id)
    for name in os.listdir(tok_dir):
        if name != "config.json":
            shutil.copy(os.path.join(tok_dir, name), d)
    path = os.path.join(d, SINGLE_FILE)
    tensors = safetensors.numpy.load_file(path)
    keys = {"nan": next(k for k in tensors if "layers.1.self_attn.q_proj.weight" in k
                        and "vision" not in k),
            "inf": next(k for k in tensors if "layers.0.mlp.up_proj.weight" in k)}
    tensors[keys["nan"]][3, 5] = np.nan
    tensors[keys["inf"]][0, 0] = -np.inf
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "pic.png")
    pope = root / "coco_pope_random.json"
    pope.write_text(json.dumps({"question_id": 1, "image": "pic.png", "text": "Is there a dog?",
                                "label": "no"}) + "\n")
    return d, keys, str(pope)


def test_nonfinite_weights_load_only_when_not_checked(nan_ckpt):
    d, keys, _ = nan_ckpt
    _, params = load_hf(d)  # off by default: training and convert copy what they are given
    q = params["language_model"]["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert bool(jnp.isnan(q).any())
    for scan_layers in (False, True):
        with pytest.raises(NonFiniteWeightsError) as e:
            load_hf(d, check_finite=True, scan_layers=scan_layers)
        msg = str(e.value)
        assert msg.startswith(f"{d}: 2 parameter array(s) hold NaN or Inf")
        assert f"{keys['nan']} ({SINGLE_FILE})" in msg and f"{keys['inf']} ({SINGLE_FILE})" in msg


def test_check_finite_names_parameter_paths(nan_ckpt):
    d, _, _ = nan_ckpt
    _, params = load_hf(d, scan_layers=True)
    with pytest.raises(NonFiniteWeightsError) as e:
        mllm_jax.convert.check_finite(params, "my checkpoint")
    assert str(e.value).startswith("my checkpoint: 2 parameter array(s)")
    assert "language_model/model/layers/self_attn/q_proj/kernel [layer 1]" in str(e.value)
    clean = jax.tree.map(lambda x: jnp.nan_to_num(x, posinf=0.0, neginf=0.0), params)
    mllm_jax.convert.check_finite(clean, "my checkpoint")


def test_generate_chat_and_eval_refuse_nonfinite_weights(nan_ckpt, tmp_path, capsys,
                                                         monkeypatch):
    d, keys, pope = nan_ckpt
    assert main(["generate", "--ckpt", d, "--template", "chatml", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mllm-jax generate: error: {d}: 2 parameter array(s) hold NaN")
    assert keys["nan"] in err and "Traceback" not in err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    assert main(["chat", "--ckpt", d, "--template", "chatml"]) == 1
    assert keys["nan"] in capsys.readouterr().err
    assert main(["eval", "--ckpt", d, "--task", "pope", "--data", pope, "--image-root",
                 os.path.dirname(pope), "--output", str(tmp_path / "out"), "--template",
                 "chatml", "--max-new-tokens", "1"]) == 1
    assert keys["nan"] in capsys.readouterr().err


def test_conversions_carry_the_recorded_chat_template(llama_dir, tmp_path):
    """A template recorded in an HF checkpoint survives hf-to-orbax and orbax-to-hf."""
    from mllm_jax.infer import read_chat_template, write_chat_template
    src = tmp_path / "hf"
    shutil.copytree(llama_dir, src)
    write_chat_template(src, "mistral", prompt_suffixes={"short_answer": ""})
    assert main(["convert", "hf-to-orbax", str(src), str(tmp_path / "o")]) == 0
    assert main(["convert", "orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "back")]) == 0
    for d in (tmp_path / "o", tmp_path / "back"):
        assert read_chat_template(d) == read_chat_template(src)
    assert read_chat_template(src).name == "mistral"
    # Nothing recorded: nothing written.
    assert main(["convert", "hf-to-orbax", llama_dir, str(tmp_path / "o2")]) == 0
    assert read_chat_template(tmp_path / "o2") is None


def test_orbax_exports_are_checked_like_hf_ones(llama_dir, tmp_path):
    """load_orbax: model_config.json checked before anything is built, non-finite weights
    refused on request."""
    model, params = load_hf(llama_dir)
    bad = jax.tree.map(lambda x: x, params)
    bad["model"]["norm"]["scale"] = bad["model"]["norm"]["scale"].at[1].set(jnp.inf)
    d = tmp_path / "o"
    save_orbax(model, bad, d)
    load_orbax(d)  # loads unchecked by default, like load_hf
    with pytest.raises(NonFiniteWeightsError, match="model/norm/scale") as e:
        load_orbax(d, check_finite=True)
    assert str(d) in str(e.value)
    config = d / "model_config.json"
    cfg = json.loads(config.read_text())
    cfg["text"]["num_hidden_layers"] = 200000
    config.write_text(json.dumps(cfg))
    with pytest.raises(InvalidConfigError, match="num_hidden_layers = 200000") as e:
        load_orbax(d)
    assert str(config) in str(e.value)
    config.write_text('{"model_type": ')
    with pytest.raises(ValueError, match="is not a valid model config") as e:
        load_orbax(d)
    assert str(config) in str(e.value)
