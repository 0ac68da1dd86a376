"""Checkpoints in the LLaVA repository's layout (`llava_llama`, `llava_mistral`, `llava_qwen`,
and `llava` of the first LLaVA-1.5 releases): built here from tiny random HF LLaVA models,
their tensors written under the repository's names with a config.json as the repository
writes it; `load_hf` gives the logits of the HF model holding the same weights, through the
repository's -200 image ids; `save_hf` writes the original key set, tensors and config.json
back; the settings the model cannot honour are refused by name."""
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import hf_factories as hf
import mllm_jax
from mllm_jax import config as mc
from mllm_jax.convert import hf_config
from mllm_jax.models import llava_repo, llava_repo_inputs
from mllm_jax.models.registry import InvalidConfigError, UnsupportedModelError

# The state_dict keys of the repository's LlavaLlamaForCausalLM / LlavaMistralForCausalLM
# (llava-torch 1.2.2.post1, built from a tiny config under transformers 4.37.2, the version
# it pins, with its tower loaded; N: a layer). LLaVA-NeXT's LlavaQwenForCausalLM is the same
# LlavaMetaModel over Qwen2 (`llava/model/language_model/llava_qwen.py`), with q/k/v biases.
REPO_LLM_KEYS = [
    "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
    "model.layers.N.input_layernorm.weight", "model.layers.N.post_attention_layernorm.weight",
    "model.layers.N.mlp.down_proj.weight", "model.layers.N.mlp.gate_proj.weight",
    "model.layers.N.mlp.up_proj.weight", "model.layers.N.self_attn.k_proj.weight",
    "model.layers.N.self_attn.o_proj.weight", "model.layers.N.self_attn.q_proj.weight",
    "model.layers.N.self_attn.v_proj.weight"]
REPO_PROJECTOR_KEYS = {  # mm_projector_type -> keys
    "mlp2x_gelu": ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                   "model.mm_projector.2.bias", "model.mm_projector.2.weight"],
    "linear": ["model.mm_projector.bias", "model.mm_projector.weight"]}
_TOWER = "model.vision_tower.vision_tower.vision_model."
REPO_TOWER_KEYS = [_TOWER + k for k in [
    "embeddings.class_embedding", "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight", "post_layernorm.bias", "post_layernorm.weight",
    "pre_layrnorm.bias", "pre_layrnorm.weight"] + [
    f"encoder.layers.N.{m}.{leaf}" for m in (
        "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", "self_attn.k_proj",
        "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj")
    for leaf in ("bias", "weight")]]

V = hf.TEXT_DEFAULTS["vocab_size"]  # the stored vocabulary; the HF models' image token: V - 1
HUB_TOWER = "openai/clip-vit-large-patch14-336"

# name -> how the tiny checkpoint differs from LLaVA-1.5's defaults
CASES = {
    # tower tensors in the checkpoint, mm_vision_tower a local directory, layer -3
    "llama": dict(model_type="llava_llama", text="llama", projector="mlp2x_gelu",
                  feature="patch", layer=-3, tower_in_checkpoint=True, tied=False),
    # tower from `vision_tower=` (a CLIPModel directory), mm_vision_tower a hub id, CLS kept
    "mistral": dict(model_type="llava_mistral", text="mistral", projector="mlp2x_gelu",
                    feature="cls_patch", layer=-2, tower_in_checkpoint=False, tied=False),
    # tied embeddings (no lm_head stored), q/k/v biases
    "qwen": dict(model_type="llava_qwen", text="qwen2", projector="mlp2x_gelu",
                 feature="patch", layer=-2, tower_in_checkpoint=True, tied=True),
    # the `linear` projector and the first LLaVA-1.5 releases' model_type spelling
    "linear": dict(model_type="llava", text="llama", projector="linear", feature="patch",
                   layer=-2, tower_in_checkpoint=True, tied=False),
}
TEXT_OVERRIDES = {"llama": dict(rms_norm_eps=1e-6,
                                rope_parameters=dict(rope_type="default", rope_theta=5e5)),
                  "mistral": dict(sliding_window=None),
                  "qwen2": dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))}


def repo_keys(case, n_layers, n_tower_layers):
    keys = [k for k in REPO_LLM_KEYS if not (case["tied"] and k == "lm_head.weight")]
    if case["text"] == "qwen2":
        keys += [f"model.layers.N.self_attn.{p}_proj.bias" for p in "qkv"]
    keys += REPO_PROJECTOR_KEYS[case["projector"]]
    if case["tower_in_checkpoint"]:
        keys += REPO_TOWER_KEYS
    out = []
    for k in keys:
        n = n_tower_layers if k.startswith(_TOWER) else n_layers
        out += [k.replace(".N.", f".{i}.") for i in range(n)] if ".N." in k else [k]
    return sorted(out)


def repo_name(key):
    """HF LlavaForConditionalGeneration's (transformers 5, in memory) name -> the
    repository's."""
    for pattern, repl in ((r"^model\.language_model\.", "model."),
                          (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
                          (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
                          (r"^model\.vision_tower\.", _TOWER),
                          (r"^lm_head\.", "lm_head.")):
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise AssertionError(key)


def repo_config(case, text_cfg, vision_cfg, tower):
    """config.json as the repository writes it (the LLM's fields at top level, as
    transformers 4 spells them, and LLaVA's)."""
    t = text_cfg
    d = dict(
        model_type=case["model_type"], architectures=[{
            "llava_llama": "LlavaLlamaForCausalLM", "llava": "LlavaLlamaForCausalLM",
            "llava_mistral": "LlavaMistralForCausalLM",
            "llava_qwen": "LlavaQwenForCausalLM"}[case["model_type"]]],
        vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_theta=(t.rope_parameters or {}).get("rope_theta", 10000.0), rope_scaling=None,
        hidden_act="silu",
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        tie_word_embeddings=case["tied"], torch_dtype="float32", use_cache=True,
        transformers_version="4.37.2", initializer_range=0.02,
        mm_vision_tower=tower, mm_hidden_size=vision_cfg.hidden_size,
        mm_vision_select_layer=case["layer"], mm_vision_select_feature=case["feature"],
        mm_projector_type=case["projector"], mm_patch_merge_type="flat",
        image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, use_mm_proj=True,
        unfreeze_mm_vision_tower=False, mm_projector_lr=None, tokenizer_model_max_length=2048,
        tokenizer_padding_side="right")
    if case["text"] == "mistral":
        d["sliding_window"] = None
    if case["text"] == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=2)
    return d


def build(root, name):
    """(checkpoint directory, tower directory, HF reference model, repo tensors)."""
    case = CASES[name]
    torch_model = hf.build_llava(
        text_model_type=case["text"], text_overrides=TEXT_OVERRIDES.get(case["text"]),
        vision_feature_layer=case["layer"],
        vision_feature_select_strategy="full" if case["feature"] == "cls_patch" else "default",
        tie_word_embeddings=case["tied"], seed=len(name))
    if case["projector"] == "linear":
        # The repository's `linear` projector, nn.Linear(mm_hidden_size, hidden_size), in
        # the HF model's place for the reference forward.
        torch.manual_seed(1)
        c = torch_model.config
        torch_model.model.multi_modal_projector = torch.nn.Linear(
            c.vision_config.hidden_size, c.text_config.hidden_size).eval()
    ckpt, tower = root / name, root / f"{name}-tower"
    ckpt.mkdir()
    torch_model.model.vision_tower.save_pretrained(tower)  # a CLIPVisionModel directory
    tensors = {}
    for k, v in torch_model.state_dict().items():
        if case["tied"] and k == "lm_head.weight":
            continue
        if case["projector"] == "linear" and k.startswith("model.multi_modal_projector."):
            k = "model.mm_projector." + k.split(".")[-1]
        if k.startswith("model.vision_tower.") and not case["tower_in_checkpoint"]:
            continue
        tensors[k if k.startswith("model.mm_projector.") else repo_name(k)] = v.contiguous()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    if not case["tower_in_checkpoint"]:
        # A CLIPModel directory: the vision part under `vision_model.`, plus a text part.
        tower = root / f"{name}-clip"
        tower.mkdir()
        clip = {"vision_model." + k: v.contiguous()
                for k, v in torch_model.model.vision_tower.state_dict().items()}
        clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
        clip["logit_scale"] = torch.zeros(())
        save_file(clip, tower / "model.safetensors", metadata={"format": "pt"})
        vision = torch_model.config.vision_config.to_dict()
        (tower / "config.json").write_text(json.dumps(
            {"model_type": "clip", "architectures": ["CLIPModel"], "vision_config": vision,
             "text_config": {"hidden_size": 4}}))
    named = HUB_TOWER if not case["tower_in_checkpoint"] else str(tower)
    config = repo_config(case, torch_model.config.text_config,
                         torch_model.config.vision_config, named)
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return ckpt, tower, torch_model, tensors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_repo")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(root, name)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def loaded(checkpoints):
    cache = {}

    def get(name):
        if name not in cache:
            ckpt, tower, _, _ = checkpoints(name)
            kw = {} if CASES[name]["tower_in_checkpoint"] else {"vision_tower": tower}
            cache[name] = mllm_jax.load_hf(ckpt, **kw)
        return cache[name]
    return get


def repo_input_ids(cfg, seed=0):
    """Two prompts as the repository's `tokenizer_image_token` gives them: an image (-200)
    between text tokens (never the HF models' image token V - 1)."""
    rng = np.random.RandomState(seed)
    rows = []
    for before, after in ((2, 5), (4, 3)):
        text = rng.randint(3, V - 1, size=before + after).tolist()
        rows.append([1] + text[:before] + [llava_repo.IMAGE_TOKEN_INDEX] + text[before:])
    return rows


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_the_hf_model_holding_the_same_weights(checkpoints, loaded, name):
    _, _, torch_model, _ = checkpoints(name)
    model, params = loaded(name)
    cfg = model.cfg
    assert cfg.model_type == "llava" and cfg.checkpoint_layout.name == "llava_repo"
    assert cfg.projector.type == CASES[name]["projector"]
    assert cfg.vision_feature_layer == CASES[name]["layer"]
    assert cfg.image_token_index == V and cfg.text.vocab_size == V + 1
    assert cfg.checkpoint_layout.vocab_size == V
    ids = np.asarray([llava_repo_inputs.model_input_ids(r, cfg)
                      for r in repo_input_ids(cfg)])
    assert (ids == V).sum() == 2 * cfg.image_seq_length
    nhwc, nchw = hf.random_pixels(2, cfg.vision.image_size, seed=3)
    ours = model.apply({"params": params}, jnp.asarray(ids), pixel_values=jnp.asarray(nhwc))
    assert ours.shape == (2, ids.shape[1], V + 1)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(np.where(ids == V, V - 1, ids)),
                             pixel_values=nchw).logits.numpy()
    diff = float(np.abs(np.asarray(ours)[..., :V] - theirs).max())
    print(f"{name}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-5, f"{name}: max abs logit diff {diff}"


def read_tensors(directory):
    out = {}
    for fname in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_writes_the_original_keys_tensors_and_config(checkpoints, loaded, tmp_path,
                                                            name):
    ckpt, _, torch_model, tensors = checkpoints(name)
    model, params = loaded(name)
    c = torch_model.config
    assert sorted(tensors) == repo_keys(CASES[name], c.text_config.num_hidden_layers,
                                        c.vision_config.num_hidden_layers)
    out = mllm_jax.save_hf(model, params, tmp_path / "export")
    written = read_tensors(out)
    assert sorted(written) == sorted(tensors)
    for k, v in tensors.items():
        assert written[k].dtype == v.dtype and written[k].shape == v.shape, k
        assert torch.equal(written[k].view(torch.uint8), v.view(torch.uint8)), f"{k} differs"
    original = json.loads((ckpt / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in exported.items() if k != "dtype"} == original
    # ... and it reads back as the same model.
    tower = None if CASES[name]["tower_in_checkpoint"] else checkpoints(name)[1]
    again, _ = mllm_jax.load_hf(out, vision_tower=tower)
    assert comparable(again.cfg) == comparable(model.cfg)


def comparable(cfg):
    """The config as a dict, the recorded config.json without the dtype save_hf writes."""
    d = cfg.to_dict()
    d["checkpoint_layout"]["config_json"] = {
        k: v for k, v in json.loads(d["checkpoint_layout"]["config_json"]).items()
        if k != "dtype"}
    return d


def test_padded_row_holds_the_mean_of_the_stored_rows(checkpoints, loaded):
    _, _, _, tensors = checkpoints("llama")
    _, params = loaded("llama")
    lm = params["language_model"]
    for ours, key in ((lm["model"]["embed_tokens"]["embedding"], "model.embed_tokens.weight"),
                      (lm["lm_head"]["kernel"].T, "lm_head.weight")):
        stored = tensors[key].numpy()
        np.testing.assert_array_equal(np.asarray(ours)[:V], stored)
        np.testing.assert_allclose(np.asarray(ours)[V], stored.mean(axis=0), rtol=1e-6)


def test_hf_layout_stays_available(checkpoints, loaded, tmp_path):
    """layout="hf": an HF LlavaForConditionalGeneration with the image token added (id V)."""
    _, _, torch_model, _ = checkpoints("llama")
    model, params = loaded("llama")
    out = mllm_jax.save_hf(model, params, tmp_path / "hf", layout="hf")
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.image_token_index == V
    assert reloaded.config.text_config.vocab_size == V + 1
    ids = np.asarray([llava_repo_inputs.model_input_ids(r, model.cfg)
                      for r in repo_input_ids(model.cfg, seed=1)])
    _, nchw = hf.random_pixels(2, model.cfg.vision.image_size, seed=4)
    with torch.no_grad():
        got = reloaded(input_ids=torch.from_numpy(ids), pixel_values=nchw).logits[..., :V]
        want = torch_model(input_ids=torch.from_numpy(np.where(ids == V, V - 1, ids)),
                           pixel_values=nchw).logits
    assert float((got - want).abs().max()) <= 1e-5
    hf_model, _ = mllm_jax.load_hf(out)
    assert hf_model.cfg.get("checkpoint_layout") is None


def test_the_layout_survives_the_orbax_config_round_trip(loaded):
    model, _ = loaded("llama")
    cfg = mc.config_from_json(model.cfg.to_json())
    assert hf_config.checkpoint_layout(cfg)[0] == "llava_repo"
    assert hf_config.to_hf(cfg) == json.loads(model.cfg.checkpoint_layout.config_json)


def test_a_changed_model_is_not_written_with_its_old_config(loaded):
    model, _ = loaded("llama")
    cfg = mc.config_from_json(model.cfg.to_json())
    cfg.text.rope_theta = 10000.0
    with pytest.raises(UnsupportedModelError, match=r"text\.rope_theta: 500000\.0 when read"):
        hf_config.to_hf(cfg)
    hf_config.to_hf(cfg, "hf")  # the HF layout writes what the model is


def test_a_model_read_from_hf_is_not_written_in_the_repo_layout():
    from mllm_jax import presets
    cfg = presets.get("llava-1.5-7b")
    with pytest.raises(UnsupportedModelError, match="layout='hf'"):
        hf_config.to_hf(cfg, "llava_repo")
    with pytest.raises(UnsupportedModelError,
                       match="unknown checkpoint layout 'x'; known: hf, llava_repo"):
        hf_config.to_hf(cfg, "x")


def test_convert_cli_keeps_the_layout_through_orbax(checkpoints, tmp_path, capsys):
    from mllm_jax.cli import main
    ckpt, tower, _, tensors = checkpoints("mistral")
    orbax_dir, out = str(tmp_path / "orbax"), str(tmp_path / "repo")
    assert main(["convert", "hf-to-orbax", str(ckpt), orbax_dir, "--vision-tower",
                 str(tower)]) == 0
    assert main(["convert", "orbax-to-hf", orbax_dir, out]) == 0
    assert sorted(read_tensors(out)) == sorted(tensors)
    assert json.loads((ckpt / "config.json").read_text()).items() <= \
        json.loads(open(os.path.join(out, "config.json")).read()).items()
    assert main(["convert", "hf-to-orbax", str(ckpt), orbax_dir + "2"]) == 1
    err = capsys.readouterr().err
    assert f"mm_vision_tower = {HUB_TOWER!r}" in err and "--vision-tower DIR" in err


# ---- config.json: the tower, and what is refused ------------------------------------------


@pytest.fixture(scope="module")
def repo_dict(checkpoints):
    ckpt, tower, _, _ = checkpoints("llama")
    return json.loads((ckpt / "config.json").read_text()), ckpt, tower


def _from(d, **kw):
    return hf_config.from_hf(d, "ckpt/config.json", **kw)


def test_a_hub_tower_without_a_directory_is_refused_naming_vision_tower(repo_dict):
    d, ckpt, tower = repo_dict
    d = dict(d, mm_vision_tower=HUB_TOWER)
    with pytest.raises(UnsupportedModelError) as e:
        _from(d, directory=str(ckpt))
    msg = str(e.value)
    assert "ckpt/config.json" in msg and "mm_vision_tower" in msg and HUB_TOWER in msg
    assert "vision_tower=" in msg
    cfg = _from(d, directory=str(ckpt), vision_tower=str(tower))
    assert cfg.vision.hidden_size == hf.VISION_DEFAULTS["hidden_size"]


def test_a_tower_beside_the_checkpoint_is_found_by_its_relative_name(repo_dict, tmp_path):
    d, ckpt, tower = repo_dict
    os.symlink(ckpt / "model.safetensors", tmp_path / "model.safetensors")
    os.symlink(tower, tmp_path / "clip")
    assert _from(dict(d, mm_vision_tower="clip"), directory=str(tmp_path)).vision.image_size \
        == hf.VISION_DEFAULTS["image_size"]


@pytest.mark.parametrize("field, value, supported", [
    ("mm_patch_merge_type", "spatial_unpad", "'flat'"),
    ("image_aspect_ratio", "anyres", "'pad', 'square' or none"),
    ("mm_projector_type", "mlp3x_gelu", "linear, mlp2x_gelu"),
    ("mm_projector_type", "identity", "linear, mlp2x_gelu"),
    ("mm_vision_select_feature", "slicefour_patch", "patch, cls_patch"),
    ("mm_resampler_type", "spatial_pool", "none"),
])
def test_settings_the_model_cannot_honour_are_refused(repo_dict, field, value, supported):
    d, ckpt, _ = repo_dict
    with pytest.raises(UnsupportedModelError) as e:
        _from(dict(d, **{field: value}), directory=str(ckpt))
    assert f"ckpt/config.json: {field} = {value!r} is not supported (supported: " \
           f"{supported})" in str(e.value)


def test_a_tower_that_is_not_clip_is_refused(repo_dict, tmp_path):
    d, ckpt, _ = repo_dict
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(UnsupportedModelError,
                       match="'siglip_vision_model' tower; supported: CLIP"):
        _from(dict(d, mm_vision_tower=str(tmp_path)), directory=str(ckpt))


def test_a_select_layer_outside_the_tower_and_a_width_mismatch_are_refused(repo_dict):
    d, ckpt, _ = repo_dict
    with pytest.raises(InvalidConfigError, match="mm_vision_select_layer = -9 must be a layer"):
        _from(dict(d, mm_vision_select_layer=-9), directory=str(ckpt))
    with pytest.raises(InvalidConfigError, match="mm_hidden_size = 1024, but the vision tower"):
        _from(dict(d, mm_hidden_size=1024), directory=str(ckpt))


def test_vision_tower_is_refused_for_an_hf_checkpoint():
    with pytest.raises(UnsupportedModelError, match="vision_tower= applies to checkpoints in"):
        hf_config.from_hf({"model_type": "llava"}, "x/config.json", vision_tower="/tmp")


def test_an_hf_llava_config_is_still_read_as_hf():
    cfg = hf_config.from_hf({"model_type": "llava"})
    assert cfg.get("checkpoint_layout") is None


# ---- the inputs, as the repository builds them ---------------------------------------------


def test_prompt_and_image_settings(loaded, checkpoints):
    model, _ = loaded("llama")
    cfg = model.cfg
    ids = llava_repo_inputs.model_input_ids([1, 5, -200, 7], cfg)
    assert ids == [1, 5] + [V] * cfg.image_seq_length + [7]
    assert llava_repo_inputs.image_text(cfg) == "<image>"
    image_cfg = llava_repo_inputs.image_processor_config(cfg)
    assert image_cfg.mode == "pad" and image_cfg.crop_size["height"] == cfg.vision.image_size
    started = mc.config_from_json(cfg.to_json())
    record = json.loads(started.checkpoint_layout.config_json)
    record.update(mm_use_im_start_end=True, image_aspect_ratio="square")
    started.checkpoint_layout.config_json = json.dumps(record)
    assert llava_repo_inputs.wrap_image_placeholders("<image>\nWhat?", started) == \
        "<im_start><image><im_end>\nWhat?"
    assert llava_repo_inputs.image_processor_config(started).mode == "crop"


def test_chat_and_eval_pad_images_as_the_repository_does(checkpoints, loaded):
    """No preprocessor_config.json beside a LLaVA-repository checkpoint (its processor is the
    tower's): the CLIP preprocessing at the tower's resolution, padded to a square as
    config.json's image_aspect_ratio "pad" says."""
    from mllm_jax.infer.batching import image_config_for
    ckpt, _, _, _ = checkpoints("llama")
    model, _ = loaded("llama")
    assert image_config_for(model, str(ckpt)).mode == "pad"


def test_prompts_write_images_as_the_checkpoint_was_trained_to_see_them(loaded, tmp_path):
    """`mm_use_im_start_end`: generation prompts (chat, eval) write each image as
    `<im_start><image><im_end>`, after the template has placed it (LLaVA's
    preprocess_multimodal moves the image first, then wraps it)."""
    import types

    from test_templates import _added, make_sentencepiece

    from mllm_jax.data.templates import build_prompt, get_template
    from mllm_jax.data.tokenizer import load_tokenizer
    from mllm_jax.infer.batching import Conversation, encode_prompt
    model, _ = loaded("llama")
    started = mc.config_from_json(model.cfg.to_json())
    record = json.loads(started.checkpoint_layout.config_json)
    record["mm_use_im_start_end"] = True
    started.checkpoint_layout.config_json = json.dumps(record)
    d = make_sentencepiece(str(tmp_path / "tok"), legacy=True)
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    # A LLaVA-repository tokenizer: no "<image>" entry; the two tokens the setting adds.
    added = tok_cfg["added_tokens_decoder"]
    image = next(i for i, e in added.items() if e["content"] == "<image>")
    added.pop(image)
    added.update(_added([("<im_start>", int(image)), ("<im_end>", int(image) + 2)]))
    os.remove(os.path.join(d, "config.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f)
    tok = load_tokenizer(d)
    n = started.image_seq_length
    conversation = Conversation([{"from": "human", "value": " What is <image> here? "}],
                                images=["picture.png"])

    def expected(text):
        return build_prompt([{"from": "human", "value": text}], "vicuna_v1", tok,
                            image_tokens_per_image=n, image_token_id=V).tolist()

    for placement, text in (("llava", "<im_start><image><im_end>\nWhat is  here?"),
                            ("as_written", "What is <im_start><image><im_end> here?")):
        ids = encode_prompt(types.SimpleNamespace(cfg=started), tok, conversation,
                            get_template("vicuna_v1", placement)).tolist()
        assert ids == expected(text), placement
        start = tok.encode("<im_start>", add_bos=False)
        assert len(start) == 1 and ids[ids.index(V) - 1] == start[0]
    # Without the setting, the image is the placeholder alone.
    ids = encode_prompt(model, tok, conversation, get_template("vicuna_v1", "llava")).tolist()
    assert ids == expected("<image>\nWhat is  here?")
