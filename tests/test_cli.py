"""The `mllm-jax` command and orbax checkpoints: HF -> orbax -> HF conversions are bitwise
round trips that transformers loads; the demo runs offline; unavailable commands say so."""
import argparse
import glob
import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM,
                          LlavaConfig, LlavaForConditionalGeneration)

import mllm_jax
from mllm_jax import config as mc
from mllm_jax import presets
from mllm_jax.cli import main, parse_size
from mllm_jax.convert import hf_keys, load_hf, load_orbax, save_orbax
from mllm_jax.convert.hf_io import CheckpointMismatchError
from mllm_jax.data.image import preprocess_image
from mllm_jax.data.tokens import expand_image_tokens

VOCAB = 64
IMAGE_TOKEN = 63


def tiny_llama_config():
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


@torch.no_grad()
def _randomize_constants(model, seed):
    """Norm scales and biases start as 1 / 0 in HF; make them random so a converter that
    drops or mixes them up is caught."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") or (name.endswith("weight") and p.ndim == 1):
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize_constants(LlamaForCausalLM(tiny_llama_config()), 1)
    path = str(tmp_path_factory.mktemp("hf_llama"))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=28, patch_size=7,
                              initializer_range=0.1)
    cfg = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(),
                      image_token_index=IMAGE_TOKEN, image_seq_length=16)
    model = _randomize_constants(LlavaForConditionalGeneration(cfg), 2)
    path = str(tmp_path_factory.mktemp("hf_llava"))
    model.save_pretrained(path)
    return path


def read_canonical(directory, model_type):
    """{canonical key: tensor} of every tensor in an HF directory, read with safetensors."""
    tensors = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        for key, t in load_file(f).items():
            if any(re.search(p, key) for p in hf_keys.IGNORED_KEYS):
                continue
            tensors[hf_keys.canonical_key(key, model_type)] = t
    return tensors


def assert_bitwise_equal(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8) if got[k].dtype != torch.bfloat16
                           else got[k].view(torch.int16),
                           want[k].view(torch.uint8) if want[k].dtype != torch.bfloat16
                           else want[k].view(torch.int16)), k


def round_trip(src, tmp_path, *extra):
    orbax_dir, out = str(tmp_path / "orbax"), str(tmp_path / "hf_out")
    assert main(["convert", "hf-to-orbax", src, orbax_dir, *extra]) == 0
    assert main(["convert", "orbax-to-hf", orbax_dir, out]) == 0
    return orbax_dir, out


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_convert_llama_round_trip_is_bitwise(llama_dir, tmp_path, scan):
    orbax_dir, out = round_trip(llama_dir, tmp_path, *(["--scan-layers"] if scan else []))
    assert_bitwise_equal(read_canonical(out, "causal_lm"), read_canonical(llama_dir, "causal_lm"))
    with open(os.path.join(orbax_dir, "model_config.json")) as f:
        assert json.load(f)["scan_layers"] is scan

    original = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2, 17]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_convert_llava_round_trip_is_bitwise(llava_dir, tmp_path, scan):
    _, out = round_trip(llava_dir, tmp_path, *(["--scan-layers"] if scan else []))
    assert_bitwise_equal(read_canonical(out, "llava"), read_canonical(llava_dir, "llava"))

    original = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 16 + [5, 9, 33]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = original(input_ids=ids, pixel_values=pixels).logits
        got = reloaded(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(got, want)


def test_convert_to_bfloat16_matches_torch_cast(llama_dir, tmp_path):
    orbax_dir, out = round_trip(llama_dir, tmp_path, "--dtype", "bfloat16")
    _, params = load_orbax(orbax_dir)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want = {k: t.to(torch.bfloat16) for k, t in read_canonical(llama_dir, "causal_lm").items()}
    assert_bitwise_equal(read_canonical(out, "causal_lm"), want)
    assert LlamaForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_orbax_to_hf_max_shard_size_writes_an_index(llama_dir, tmp_path):
    orbax_dir = str(tmp_path / "orbax")
    assert main(["convert", "hf-to-orbax", llama_dir, orbax_dir]) == 0
    out = str(tmp_path / "sharded")
    assert main(["convert", "orbax-to-hf", orbax_dir, out, "--max-shard-size", "20KB"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert len(glob.glob(os.path.join(out, "*.safetensors"))) > 1
    assert_bitwise_equal(read_canonical(out, "causal_lm"), read_canonical(llama_dir, "causal_lm"))
    LlamaForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_orbax_round_trip_restores_params_and_logits(llava_dir, tmp_path, scan):
    model, params = load_hf(llava_dir, scan_layers=scan)
    save_orbax(model, params, tmp_path / "ckpt")
    model2, params2 = load_orbax(tmp_path / "ckpt")
    assert model2.cfg == model.cfg and model2.cfg.scan_layers is scan
    flat, flat2 = (flax.traverse_util.flatten_dict(p) for p in (params, params2))
    assert sorted(flat) == sorted(flat2)
    for k in flat:
        assert flat2[k].dtype == flat[k].dtype
        np.testing.assert_array_equal(np.asarray(flat2[k]), np.asarray(flat[k]))
    ids = jnp.asarray([[1] + [IMAGE_TOKEN] * 16 + [5, 9]])
    pixels = jax.random.normal(jax.random.PRNGKey(0), (1, 28, 28, 3))
    # jit: run eagerly, every op of the model would be compiled on its own.
    np.testing.assert_array_equal(jax.jit(model2.apply)({"params": params2}, ids, pixels),
                                  jax.jit(model.apply)({"params": params}, ids, pixels))


def test_load_orbax_places_arrays_on_given_shardings(llama_dir, tmp_path):
    model, params = load_hf(llama_dir)
    save_orbax(model, params, tmp_path / "ckpt")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    n = len(jax.devices())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda x: split if x.shape[0] % n == 0 else replicated, params)
    _, restored = load_orbax(tmp_path / "ckpt", shardings=shardings)
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(params),
                                   jax.tree.leaves(shardings)):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(s == split for s in jax.tree.leaves(shardings))

    _, restored = load_orbax(tmp_path / "ckpt", shardings=replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored))


def test_orbax_checkpoint_errors(llama_dir, tmp_path):
    model, params = load_hf(llama_dir)
    save_orbax(model, params, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        save_orbax(model, params, tmp_path / "ckpt")
    save_orbax(model, params, tmp_path / "ckpt", overwrite=True)

    cfg_path = tmp_path / "ckpt" / "model_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text"]["num_hidden_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="layers_2"):
        load_orbax(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_orbax(tmp_path)

    wrong = mllm_jax.build_model(presets.get("tiny-llama"))
    with pytest.raises(CheckpointMismatchError):
        save_orbax(wrong, params, tmp_path / "other")


def test_model_config_json_round_trip_keeps_field_types():
    for name in presets.names():
        cfg = presets.get(name)
        back = mc.config_from_json(cfg.to_json())
        assert back == cfg and back.to_json() == cfg.to_json(), name
    cfg = presets.get("llama-3.1-8b")
    assert type(mc.config_from_json(cfg.to_json()).text.rope_scaling) is dict

    cfg = presets.get("tiny-llava")
    cfg.vision_feature_layer = [-3, -2]
    cfg.text.sliding_window = 8
    back = mc.config_from_json(cfg.to_json())
    assert back.vision_feature_layer == [-3, -2] and back.text.sliding_window == 8
    assert back.text.rope_scaling is None
    back.text.sliding_window = None  # still a typed, optional field
    back.text.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    assert type(back.text.rope_scaling) is dict
    back.vision_feature_layer = -2


def test_demo_passes_its_options_and_prints_the_table_and_paths(tmp_path, capsys,
                                                                  monkeypatch):
    """The command's wiring; tests/test_demo.py runs the (scaled-down) demo itself."""
    import mllm_jax.demo
    from mllm_jax.demo import configs
    calls = []

    def fake_run(**kw):
        calls.append(kw)
        return {"settings": configs.settings_for(kw["scale"], kw["seed"]),
                "metrics": {"stage1": {"vqa_mean": 0.25}, "stage2": {"vqa_mean": 0.75}},
                "times": {"data": 1.0}, "total": 12.0,
                "paths": {"report": str(tmp_path / "report.md"),
                          "plot": str(tmp_path / "metrics.png")}}

    monkeypatch.setattr(mllm_jax.demo, "run", fake_run)
    assert main(["demo", "--workdir", str(tmp_path), "--seed", "7", "--scale", "test"]) == 0
    assert calls == [{"workdir": str(tmp_path), "scale": "test", "seed": 7,
                      "overwrite": False, "connector": "mlp"}]
    out = capsys.readouterr().out
    assert "seed 7" in out
    assert "| VQA accuracy, mean of kinds | 0.250 | 0.750 |" in out
    assert f"report: {tmp_path / 'report.md'}" in out
    assert f"plot: {tmp_path / 'metrics.png'}" in out
    main(["demo"])
    assert calls[-1] == {"workdir": "mllm_jax_demo", "scale": "default", "seed": 0,
                         "overwrite": False, "connector": "mlp"}
    main(["demo", "--overwrite"])
    assert calls[-1]["overwrite"] is True
    main(["demo", "--connector", "qformer"])
    assert calls[-1]["connector"] == "qformer"


def test_config_overrides_belong_to_train_and_plan_only(capsys):
    with pytest.raises(SystemExit) as e:
        main(["presets", "--config.train.lr=1e-4"])
    assert e.value.code == 2
    assert "--config.* overrides apply to train and plan only" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["convert"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["demo", "--no-such-flag"])
    assert e.value.code == 2


def test_presets_lists_every_preset_with_its_parameter_count(capsys):
    assert main(["presets"]) == 0
    rows = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(rows) == presets.names()
    assert rows["llama-2-7b"] == "6,738,415,616"  # the published LLaMA-2-7B count
    model = mllm_jax.build_model(presets.get("tiny-llava"))
    count = sum(x.size for x in jax.tree.leaves(mllm_jax.abstract_params(model)))
    assert rows["tiny-llava"] == f"{count:,}"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9
    assert parse_size("500MiB") == 500 * 2 ** 20
    assert parse_size("1234") == 1234
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("5 parsecs")


def test_preprocess_image_matches_clip_image_processor():
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (50, 37), (30, 61)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = preprocess_image(image, 28)
        hf = CLIPImageProcessor(size={"shortest_edge": 28},
                                crop_size={"height": 28, "width": 28})
        want = np.asarray(hf(images=image, return_tensors="np")["pixel_values"][0])
        assert ours.shape == (28, 28, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, want.transpose(1, 2, 0), atol=1e-5)


def test_expand_image_tokens():
    assert expand_image_tokens([1, 9, 4, 9], 9, 3) == [1, 9, 9, 9, 4, 9, 9, 9]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_blocks(lang):
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def _substitute(code, replacements):
    for old, new in replacements.items():
        assert code.count(old) == 1, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def test_readme_usage_example_runs(llava_dir, tmp_path, monkeypatch):
    """The README's Python example, pointed at a tiny local LLaVA instead of a 7B one."""
    from mllm_jax.demo import IMAGE_PATH
    code = next(b for b in _readme_blocks("python") if "load_hf(" in b)  # Usage's
    code = _substitute(code, {'"llava-1.5-7b-hf"': repr(llava_dir),
                              '"photo.png"': repr(IMAGE_PATH),
                              "1724, 338, 297": "5, 9, 33"})
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 2 + 16 + 3 - 1, VOCAB)
    assert sum(x.size for x in jax.tree.leaves(scope["shapes"])) == 7_063_427_072
    LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "exported-hf"))
    assert (tmp_path / "converted" / "model_config.json").exists()


def test_ci_script_installs_and_tests_as_the_readme_says():
    """.ci/run runs the README's test command, with its own venv and quiet pip."""
    (command,) = [b.strip() for b in _readme_blocks("bash") if "pytest" in b]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        script = f.read().replace(".venv-ci", ".venv").replace("pip install -q ", "pip install ")
    for step in command.split(" && "):
        assert step.strip() in script, step


def test_convert_reports_bad_paths_without_a_traceback(llama_dir, tmp_path, capsys):
    assert main(["convert", "hf-to-orbax", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 1
    assert "nowhere is not a directory" in capsys.readouterr().err
    assert main(["convert", "hf-to-orbax", llama_dir, str(tmp_path / "o")]) == 0
    assert main(["convert", "hf-to-orbax", llama_dir, str(tmp_path / "o")]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "orbax-to-hf", llama_dir, str(tmp_path / "hf")]) == 1
    assert "model_config.json" in capsys.readouterr().err


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_runs_a_recipe_with_dotted_overrides(tmp_path, capsys):
    workdir = tmp_path / "run"
    cfg = os.path.join(REPO, "configs", "llava15_tiny_stage1.py")
    assert main(["train", "--config", cfg, "--workdir", str(workdir),
                 "--config.train.num_steps=2", "--config.train.log_every", "1",
                 "--config.train.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    assert "step 1/2" in out and "step 2/2" in out
    assert "finished 2 steps" in out
    assert (workdir / "final" / "model_config.json").exists()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert os.listdir(workdir / "tensorboard")


def test_train_rejects_unknown_override_naming_the_field(tmp_path, capsys):
    cfg = os.path.join(REPO, "configs", "llava15_tiny_stage1.py")
    assert main(["train", "--config", cfg, "--workdir", str(tmp_path),
                 "--config.train.no_such_field=1"]) == 1
    assert "train.no_such_field" in capsys.readouterr().err


def test_bench_train_prints_one_json_line_with_both_frameworks(capsys):
    import json
    assert main(["bench", "train", "--preset", "tiny-llava", "--batch", "2", "--text-len", "16",
                 "--steps", "1"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    out = json.loads(lines[-1])
    for key in ("step_time_s", "tokens_per_s", "model_flops_per_step", "matmul_peak_flops",
                "mfu", "compile_s", "torch_step_time_s", "torch_tokens_per_s",
                "speedup_vs_torch"):
        assert out[key] > 0, key
    assert out["seq_len"] == 1 + 16 + 15  # BOS, the image's 16 tokens, 15 more text tokens
    assert out["mfu"] == pytest.approx(
        out["model_flops_per_step"] / out["step_time_s"] / out["matmul_peak_flops"], rel=5e-2)


def test_bench_data_prints_samples_per_second(capsys):
    import json
    assert main(["bench", "data", "--samples", "12", "--batch", "4", "--step-time", "2.0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples_per_s"] > 0 and out["samples_timed"] == 8
    assert out["train_samples_per_s"] == 2.0 and out["template"] == "vicuna_v1"
