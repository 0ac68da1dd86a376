"""Qwen2-VL (`model_type` qwen2_vl) against transformers' `Qwen2VLForConditionalGeneration`:
a tiny random model with non-default settings (mrope_section, RoPE bases, mlp_ratio, eps,
patch and merge sizes), images of different sizes in left-padded batches. Logits, the
ViT's merged tokens, M-RoPE positions, greedy generation, the checkpoint round trip, one
compilation per patch bucket, and the presets' parameter counts. Run with `-s` to see the
measured errors.
"""
import json

import jax
import numpy as np
import pytest
import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

import hf_factories as hf  # tests/ is on sys.path (pytest rootdir insertion)
import mllm_jax
from mllm_jax import presets
from mllm_jax.convert import hf_config
from mllm_jax.infer import generate as gen
from mllm_jax.models import registry
from mllm_jax.models.qwen2_vl_vision import pad_patches, patch_bucket

ATOL = 1e-4
PAD, BOS, EOS = 0, 1, 2
IMAGE, VSTART, VEND = 120, 118, 119
PATCH_DIM = 3 * 2 * 4 * 4  # C * T * P * P
GRIDS = np.array([[1, 4, 6], [1, 6, 6]])  # 24 and 36 patches: 6 and 9 merged tokens
ERRORS = {}


TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, initializer_range=0.3,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                             "mrope_section": [2, 3, 3]},
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
TOKENS = dict(image_token_id=IMAGE, video_token_id=121, vision_start_token_id=VSTART,
              vision_end_token_id=VEND)


def tiny_config():
    return Qwen2VLConfig(
        text_config=TEXT, **TOKENS,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                           in_channels=3, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, initializer_range=0.1,
                           rope_parameters={"rope_type": "axial", "rope_theta": 2000.0}))


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if ERRORS:
        print("\nqwen2_vl max |jax - torch|:")
        for case, err in sorted(ERRORS.items()):
            print(f"  {case:<12} {err:.3e}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = hf.randomize_extras_(Qwen2VLForConditionalGeneration(tiny_config()), seed=1).eval()
    path = hf.save(model, tmp_path_factory.mktemp("qwen2_vl"))
    ours, params = mllm_jax.load_hf(path)
    return model, str(path), ours, params


def patches(grids, seed=0):
    n = int(np.prod(grids, axis=1).sum())
    return np.random.RandomState(seed).standard_normal((n, PATCH_DIM)).astype(np.float32)


def prompt(rs, n_before, grids, n_after):
    """BOS, text, then each image as <vision_start> <image>*tokens <vision_end>, then text."""
    ids = [BOS] + list(rs.randint(3, 110, n_before))
    for g in grids:
        ids += [VSTART] + [IMAGE] * (int(np.prod(g)) // 4) + [VEND] + list(rs.randint(3, 110, 2))
    return ids + list(rs.randint(3, 110, n_after))


def left_pad(samples):
    s = max(len(x) for x in samples)
    ids = np.full((len(samples), s), PAD, np.int64)
    mask = np.zeros((len(samples), s), np.int64)
    for i, x in enumerate(samples):
        ids[i, s - len(x):] = x
        mask[i, s - len(x):] = 1
    return ids, mask


def torch_inputs(ids, mask, pixel_values=None, grids=None):
    out = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64)))
    if pixel_values is not None:
        out.update(pixel_values=torch.from_numpy(pixel_values),
                   image_grid_thw=torch.from_numpy(grids))
    return out


_TOWERS = {}


def vision_tower(model):
    """The jitted ViT alone: (params, patches, grid_thw) -> merged tokens."""
    if id(model) not in _TOWERS:
        _TOWERS[id(model)] = jax.jit(lambda p, x, g: model.apply(
            {"params": p}, x, g, method=lambda m, x, g: m.visual(x, g)))
    return _TOWERS[id(model)]


def record(case, ours, ref):
    err = float(np.max(np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32))))
    ERRORS[case] = err
    assert np.isfinite(err) and err <= ATOL, f"{case}: {err:.3e}"


def test_vision_tower_matches_hf_bucketed_or_not(tiny):
    ref_model, _, model, params = tiny
    pv = patches(GRIDS)
    with torch.no_grad():
        ref = ref_model.model.visual(torch.from_numpy(pv),
                                     grid_thw=torch.from_numpy(GRIDS)).pooler_output.numpy()
    exact = vision_tower(model)(params, pv, GRIDS)
    bucketed = vision_tower(model)(params, *pad_patches(pv, GRIDS, model.cfg.vision))
    assert exact.shape[0] == ref.shape[0] == 15 and bucketed.shape[0] == 16  # 60 -> 64 patches
    record("vit", exact, ref)
    np.testing.assert_allclose(np.asarray(bucketed)[:15], np.asarray(exact), atol=1e-6)


def test_rope_index_matches_hf_get_rope_index(tiny):
    ref_model, _, model, params = tiny
    rs = np.random.RandomState(1)
    grids = np.array([[1, 4, 6], [1, 6, 6], [1, 2, 4], [1, 4, 2]])
    ids, mask = left_pad([prompt(rs, 3, grids[:1], 4),        # one image, padded
                          prompt(rs, 1, grids[1:3], 2),       # two images
                          [BOS] + list(rs.randint(3, 110, 6)),  # text only, padded
                          prompt(rs, 0, grids[3:], 0)])       # an image, ending in text
    t = torch_inputs(ids, mask)
    ref_pos, ref_delta = ref_model.model.get_rope_index(
        t["input_ids"], t["mm_token_type_ids"], torch.from_numpy(grids),
        attention_mask=t["attention_mask"])
    # Traced ids, grids and mask: one program for every grid.
    pos, delta = jax.jit(lambda i, g, m: model.apply({"params": params}, i, g, m,
                                                     method="positions"))(ids, grids, mask)
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy().ravel())


def test_logits_match_hf_left_padded_two_image_sizes(tiny):
    ref_model, _, model, params = tiny
    rs = np.random.RandomState(2)
    ids, mask = left_pad([prompt(rs, 3, GRIDS[:1], 5), prompt(rs, 1, GRIDS[1:], 1)])
    assert (mask == 0).any()  # a sample is padded
    pv = patches(GRIDS, seed=3)
    with torch.no_grad():
        ref = ref_model(**torch_inputs(ids, mask, pv, GRIDS)).logits.numpy()
    ours = jax.jit(model.apply)({"params": params}, ids, pixel_values=pv, image_grid_thw=GRIDS,
                                attention_mask=mask)
    valid = mask.astype(bool)
    record("logits", np.asarray(ours)[valid], ref[valid])


def test_hf_round_trip_is_bitwise(tiny, tmp_path):
    ref_model, _, model, params = tiny
    out = mllm_jax.save_hf(model, params, tmp_path / "out")
    back, info = Qwen2VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref_state, state = ref_model.state_dict(), back.state_dict()
    assert ref_state.keys() == state.keys()
    for k, v in ref_state.items():
        assert torch.equal(v, state[k]), k
    again, params2 = mllm_jax.load_hf(out)
    assert again.cfg.to_dict() == model.cfg.to_dict()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_transformers5_in_memory_names_read_as_aliases(tiny, tmp_path):
    """Keys saved under transformers 5's in-memory names (`model.visual.*`,
    `model.language_model.*`) read as the published names."""
    from safetensors.numpy import load_file, save_file
    _, path, model, params = tiny
    tensors = load_file(f"{path}/model.safetensors")
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.")
                else k): v for k, v in tensors.items()}
    (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
    save_file(renamed, str(tmp_path / "model.safetensors"))
    _, params2 = mllm_jax.load_hf(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_greedy_generation_matches_hf_generate(tiny):
    ref_model, _, model, params = tiny
    rs = np.random.RandomState(4)
    ids, mask = left_pad([prompt(rs, 2, GRIDS[1:], 3), prompt(rs, 4, GRIDS[:1], 1)])
    grids = GRIDS[::-1].copy()  # the images in the order their tokens appear
    pv = patches(grids, seed=5)
    with torch.no_grad():
        expected = ref_model.generate(**torch_inputs(ids, mask, pv, grids), do_sample=False,
                                      max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    expected = expected[:, ids.shape[1]:].numpy()
    assert len(set(expected[0].tolist())) > 3, expected  # not degenerate
    ours = gen.generate(model, params, ids, mask, pixel_values=pv, image_grid_thw=grids,
                        max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)


def test_vit_compiles_once_per_patch_bucket(tiny):
    """Batches of 2 and 3 images of other sizes whose patches share a bucket run one
    compiled tower; a batch past it compiles a second. Results equal the unpadded
    computation (transformers' tower on the images' own patches)."""
    ref_model, _, model, params = tiny
    traces = []

    @jax.jit
    def tower(pv, grid):
        traces.append(pv.shape)
        return model.apply({"params": params}, pv, grid, method=lambda m, x, g: m.visual(x, g))

    batches = [GRIDS, np.array([[1, 2, 4], [1, 4, 4], [1, 2, 6]]), np.array([[1, 8, 10]])]
    sizes = [patch_bucket(int(np.prod(g, axis=1).sum()), model.cfg.vision) for g in batches]
    assert sizes == [64, 64, 128]
    for grids in batches:
        pv = patches(grids, seed=len(grids))
        out = tower(*pad_patches(pv, grids, model.cfg.vision))
        with torch.no_grad():
            exact = ref_model.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(
                grids)).pooler_output.numpy()
        np.testing.assert_allclose(np.asarray(out)[:exact.shape[0]], exact, atol=1e-5)
    assert traces == [(64, PATCH_DIM), (128, PATCH_DIM)]
    assert tower._cache_size() == 2


def test_tokens_per_image_is_merged_tokens_after_smart_resize(tiny):
    _, _, model, _ = tiny
    cfg = model.cfg
    for h, w in [(28, 28), (100, 37), (333, 500), (8, 8)]:
        rh, rw = hf_resize(h, w, factor=8, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert registry.tokens_per_image(cfg, (h, w)) == (rh // 8) * (rw // 8)
    # The 7B preset at 1000 x 700: smart_resize to 1008 x 700 (factor 28).
    assert registry.tokens_per_image(presets.get("qwen2-vl-7b"), (1000, 700)) == 36 * 25


@pytest.mark.parametrize("name, billions", [("qwen2-vl-2b", 2.21), ("qwen2-vl-7b", 8.29),
                                            ("qwen2.5-vl-7b", 8.29)])
def test_presets_match_transformers_meta_models(name, billions):
    cfg = presets.get(name)
    model = mllm_jax.build_model(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *registry.init_inputs(cfg))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
    config_cls, model_cls = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}[cfg.model_type]
    with torch.device("meta"):
        ref = model_cls(config_cls(**hf_config.to_hf(cfg)))
    n_hf = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_hf
    assert abs(n_ours / 1e9 - billions) < 0.01 * billions, n_ours
    back = hf_config.from_hf(json.loads(json.dumps(hf_config.to_hf(cfg))))
    assert back.to_dict() == cfg.to_dict()


def test_qwen2_5_vl_window_attention_logits_and_round_trip(tmp_path):
    """Qwen2.5-VL: RMSNorms, the gated MLP and window attention in the tower (windows of
    2x2 merged tokens, the second block attending over whole images), the same LLM."""
    torch.manual_seed(7)
    config = Qwen2_5_VLConfig(
        text_config=TEXT, **TOKENS,
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48,
                           num_heads=4, in_channels=3, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                           initializer_range=0.1,
                           rope_parameters={"rope_type": "axial", "rope_theta": 2000.0}))
    ref_model = hf.randomize_extras_(Qwen2_5_VLForConditionalGeneration(config), seed=8).eval()
    path = hf.save(ref_model, tmp_path / "hf")
    model, params = mllm_jax.load_hf(path)
    assert model.cfg.model_type == "qwen2_5_vl" and model.cfg.vision.window_size == 16
    rs = np.random.RandomState(9)
    ids, mask = left_pad([prompt(rs, 3, GRIDS[:1], 5), prompt(rs, 1, GRIDS[1:], 1)])
    pv = patches(GRIDS, seed=10)
    with torch.no_grad():
        ref_vis = ref_model.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(GRIDS))
        ref = ref_model(**torch_inputs(ids, mask, pv, GRIDS)).logits.numpy()
    record("2.5 vit", vision_tower(model)(params, pv, GRIDS), ref_vis.pooler_output.numpy())
    ours = jax.jit(model.apply)({"params": params}, ids, pixel_values=pv, image_grid_thw=GRIDS,
                                attention_mask=mask)
    valid = mask.astype(bool)
    record("2.5 logits", np.asarray(ours)[valid], ref[valid])
    out = mllm_jax.save_hf(model, params, tmp_path / "out")
    back, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


# Qwen/Qwen2-VL-2B-Instruct's config.json as transformers 4 wrote it: text fields at the top
# level, RoPE as rope_theta and rope_scaling {"type": "mrope"}, the tower's `in_chans`.
QWEN2_VL_2B_V4 = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                      "in_chans": 3, "hidden_size": 1536, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def test_transformers4_flat_config_reads_as_the_preset():
    cfg = hf_config.from_hf(json.loads(json.dumps(QWEN2_VL_2B_V4)))
    preset = presets.get("qwen2-vl-2b")
    for c in (cfg, preset):
        c.text.pad_token_id = None
    assert cfg.to_dict() == preset.to_dict()
