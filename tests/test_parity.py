"""Logit parity with the PyTorch references: tiny random HF models (built with transformers'
own classes, saved with `save_pretrained`) loaded with `mllm_jax.load_hf`, unrolled and
scanned, compared in float32 with max |jax - torch| <= 1e-4.

HF models are built once per module (module-scoped fixtures) and shared by the
parametrizations. Run with `-s` to see the table of measured errors.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_factories as hf  # tests/ is on sys.path (pytest rootdir insertion)
import mllm_jax
from mllm_jax.models import rope
from mllm_jax.models.vit import select_features

ATOL = 1e-4
SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
VOCAB = hf.TEXT_DEFAULTS["vocab_size"]
PAD = hf.TEXT_DEFAULTS["pad_token_id"]
# One sequence length for the text and LLaVA cases (two 16-token images plus text): the
# unrolled models run op by op, and equal shapes reuse the primitives compiled for earlier
# cases, which keeps the module fast.
SEQ = 42
ERRORS = {}  # case -> max abs error, printed at module teardown


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if ERRORS:
        width = max(len(k) for k in ERRORS)
        print("\nmax |logits_jax - logits_torch| per case:")
        for case, err in sorted(ERRORS.items()):
            print(f"  {case:<{width}}  {err:.3e}")


def assert_close(case, ours, ref, valid=None):
    """Max abs error over `valid` positions ([batch, seq] bool) or everything."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (case, ours.shape, ref.shape)
    diff = np.abs(ours - ref)
    if valid is not None:
        diff = diff[np.asarray(valid, bool)]
    err = float(diff.max())
    ERRORS[case] = max(err, ERRORS.get(case, 0.0))
    assert np.isfinite(err) and err <= ATOL, f"{case}: max abs error {err:.3e} > {ATOL}"
    return err


def left_padded_batch(lengths, seq_len, seed=0):
    """Random token ids (avoiding special and image ids), left padded; (ids, mask) int64."""
    rs = np.random.RandomState(seed)
    ids = np.full((len(lengths), seq_len), PAD, np.int64)
    mask = np.zeros((len(lengths), seq_len), np.int64)
    for i, n in enumerate(lengths):
        ids[i, seq_len - n:] = rs.randint(3, VOCAB - 1, n)
        ids[i, seq_len - n] = hf.TEXT_DEFAULTS["bos_token_id"]
        mask[i, seq_len - n:] = 1
    return ids, mask


def torch_logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids),
                    attention_mask=None if mask is None else torch.from_numpy(mask), **kw)
    return out.logits.float().numpy()


def jax_logits(path, scan, ids, mask=None, pixel_values=None):
    model, params = mllm_jax.load_hf(path, scan_layers=scan)
    # Scanned stacks compile their body anyway, and one compile of the whole model is cheaper;
    # unrolled ones run op by op, reusing primitives compiled for earlier cases of equal shapes.
    apply = jax.jit(model.apply) if scan else model.apply
    return np.asarray(apply(
        {"params": params}, jnp.asarray(ids, jnp.int32),
        pixel_values=None if pixel_values is None else jnp.asarray(pixel_values),
        attention_mask=None if mask is None else jnp.asarray(mask, jnp.int32)))


def _legacy_rope_config(path):
    """Rewrites config.json the way published (transformers v4) checkpoints store RoPE:
    top-level `rope_theta` and `rope_scaling`, the latter with the old `type` key."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


# ---- decoder-only LLMs -----------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          # head_dim 16: wavelengths 2*pi*theta^(2i/16) put some frequencies in each of the
          # three llama3 bands (kept, smoothed, divided by factor) for this original length.
          "original_max_position_embeddings": 256}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}

TEXT_CASES = {
    "llama-gqa": dict(model_type="llama"),
    "llama-mha-tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama-llama3-rope": dict(model_type="llama", rope_parameters=LLAMA3,
                              max_position_embeddings=2048),
    "llama-linear-rope": dict(model_type="llama", rope_parameters=LINEAR),
    "qwen2-bias": dict(model_type="qwen2", num_key_value_heads=2),
    # window 4 << SEQ tokens; eager attention (see test_mistral_window_is_exercised for sdpa).
    "mistral-window4": dict(model_type="mistral", sliding_window=4, attn_implementation="eager"),
}


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """name -> (torch model as transformers reads it back from disk, checkpoint dir)."""
    cache = {}

    def get(name):
        if name not in cache:
            kw = dict(TEXT_CASES[name])
            attn = kw.pop("attn_implementation", None)
            seed = list(TEXT_CASES).index(name)  # fixed per case, whatever runs first
            path = hf.make_causal_lm(tmp_path_factory.mktemp(name), seed=seed, **kw)
            # The reference is the model as transformers reads it back from disk.
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation=attn or "sdpa").eval()
            cache[name] = (model, path)
        return cache[name]

    return get


@SCAN
@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_causal_lm_logits(text_models, name, scan):
    model, path = text_models(name)
    # Sample 1 is left padded; only real-token positions are compared.
    ids, mask = left_padded_batch([SEQ, 30], SEQ, seed=1)
    ref = torch_logits(model, ids, mask)
    ours = jax_logits(path, scan, ids, mask)
    assert_close(f"{name}/{'scan' if scan else 'unrolled'}", ours, ref, valid=mask)


@SCAN
def test_causal_lm_without_attention_mask(text_models, scan):
    model, path = text_models("llama-gqa")
    ids, _ = left_padded_batch([SEQ, SEQ], SEQ, seed=2)
    assert_close(f"llama-gqa-no-mask/{'scan' if scan else 'unrolled'}",
                 jax_logits(path, scan, ids), torch_logits(model, ids))


def test_text_configs_are_what_the_cases_claim(text_models):
    """Guards the test setup itself: a case that silently lost its feature proves nothing."""
    llama, _ = text_models("llama-gqa")
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    tied, _ = text_models("llama-mha-tied")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    qwen, _ = text_models("qwen2-bias")
    attn = qwen.model.layers[0].self_attn
    assert attn.o_proj.bias is None
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias.abs().min() > 0


@pytest.mark.parametrize("name", ["llama-llama3-rope", "llama-linear-rope"])
@pytest.mark.parametrize("legacy_json", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_rope_scaling_matches_hf(text_models, tmp_path, name, legacy_json):
    """Our inverse frequencies equal HF's `inv_freq` buffer, for config.json written by
    transformers 5 (`rope_parameters`) and as published v4 checkpoints spell it (top-level
    `rope_theta` + `rope_scaling` with `type`), which transformers 5.23 also reads."""
    model, path = text_models(name)
    expected = model.model.rotary_emb.inv_freq.numpy()
    if legacy_json:
        path = shutil.copytree(path, tmp_path / "legacy")
        _legacy_rope_config(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        np.testing.assert_array_equal(model.model.rotary_emb.inv_freq.numpy(), expected)
    assert model.model.rotary_emb.attention_scaling == 1.0
    ours, _ = mllm_jax.load_hf(path)
    t = ours.cfg.text
    assert not np.allclose(expected, rope.inverse_frequencies(t.head_dim, t.rope_theta))
    np.testing.assert_allclose(
        rope.inverse_frequencies(t.head_dim, t.rope_theta, dict(t.rope_scaling)), expected,
        rtol=1e-6)
    if legacy_json:  # the logits too, through the legacy spelling
        ids, mask = left_padded_batch([SEQ, 30], SEQ, seed=1)
        assert_close(f"{name}-legacy-json/unrolled", jax_logits(path, False, ids, mask),
                     torch_logits(model, ids, mask), valid=mask)


def test_mistral_window_is_exercised(text_models):
    """The window must change HF's logits (else the Mistral case proves nothing), and HF's
    sdpa path must agree with the eager one used as reference."""
    model, path = text_models("mistral-window4")
    assert model.config.sliding_window == 4
    ids, mask = left_padded_batch([SEQ, 30], SEQ, seed=1)
    ref = torch_logits(model, ids, mask)
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    np.testing.assert_allclose(torch_logits(sdpa, ids, mask)[mask == 1], ref[mask == 1],
                               atol=1e-5)
    no_window = AutoModelForCausalLM.from_pretrained(path, sliding_window=None,
                                                     attn_implementation="eager").eval()
    full = torch_logits(no_window, ids, mask)
    w = model.config.sliding_window
    np.testing.assert_allclose(full[0, :w], ref[0, :w], atol=1e-5)  # window not yet full
    assert np.abs(full[0, w:] - ref[0, w:]).max() > 1e-2


# ---- CLIP vision tower ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    model = hf.build_clip_vision(seed=10)
    return model, hf.save(model, tmp_path_factory.mktemp("clip"))


def _clip_outputs(model, pixels_nchw, **kw):
    with torch.no_grad():
        out = model(pixel_values=pixels_nchw, output_hidden_states=True, **kw)
    return ([h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy(),
            out.pooler_output.numpy())


@SCAN
@pytest.mark.parametrize("hw", [(28, 28), (42, 56)], ids=["native", "42x56"])
def test_clip_vision(clip, hw, scan):
    """All hidden states, LLaVA's feature selections, last_hidden_state and pooler_output.
    Other resolutions: HF with interpolate_pos_encoding=True vs. our automatic bicubic
    interpolation of the position grid."""
    model, path = clip
    rs = np.random.RandomState(3)
    nhwc = rs.standard_normal((3, *hw, 3)).astype(np.float32)  # 3 images, as in LLaVA
    nchw = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))
    native = hw == (model.config.image_size,) * 2
    hs_ref, last_ref, pooled_ref = _clip_outputs(model, nchw,
                                                 interpolate_pos_encoding=not native)
    ours_model, params = mllm_jax.load_hf(path, scan_layers=scan)
    out = ours_model.apply({"params": params}, jnp.asarray(nhwc))
    case = f"clip-{hw[0]}x{hw[1]}/{'scan' if scan else 'unrolled'}"
    assert len(out["hidden_states"]) == len(hs_ref) == model.config.num_hidden_layers + 1
    for ours, ref in zip(out["hidden_states"], hs_ref):
        assert_close(case, ours, ref)
    assert_close(case, out["last_hidden_state"], last_ref)
    assert_close(case, out["pooler_output"], pooled_ref)
    for layers, keep_cls in [(-2, False), (-2, True), ([-2, -1], False), ([-3, -1], True)]:
        ref_list = [hs_ref[i] if keep_cls else hs_ref[i][:, 1:]
                    for i in ([layers] if isinstance(layers, int) else layers)]
        ours = select_features(out["hidden_states"], layers, keep_cls=keep_cls, has_cls=True)
        assert_close(case, ours, np.concatenate(ref_list, -1))


# ---- LLaVA end to end -----------------------------------------------------------------------

LLAVA_CASES = {
    "llava-llama-layer-2": dict(text_model_type="llama"),
    "llava-llama-layers[-2,-1]-full": dict(text_model_type="llama", vision_feature_layer=[-2, -1],
                                           vision_feature_select_strategy="full"),
    "llava-qwen2-layer-2": dict(text_model_type="qwen2"),
}


@pytest.fixture(scope="module")
def llava_models(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            seed = 20 + list(LLAVA_CASES).index(name)
            model = hf.build_llava(seed=seed, **LLAVA_CASES[name])
            proj = model.model.multi_modal_projector
            assert proj.linear_1.bias.abs().min() > 0 and proj.linear_2.bias.abs().min() > 0
            cache[name] = (model, hf.save(model, tmp_path_factory.mktemp("llava")))
        return cache[name]

    return get


def tokens_per_image(config):
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + (config.vision_feature_select_strategy == "full")


def llava_batch(config, seed=0):
    """Sample 0 holds 2 images, sample 1 one image and left padding; SEQ tokens. Returns ids,
    mask, pixel_values NHWC [3, H, W, C] (images in order of appearance) and the same NCHW."""
    rs = np.random.RandomState(seed)
    n = tokens_per_image(config)
    img = [config.image_token_index] * n
    text = lambda k: list(rs.randint(3, VOCAB - 1, k))  # noqa: E731
    samples = [[1] + text(3) + img + text(2) + img + text(SEQ - 6 - 2 * n),
               [1] + text(2) + img + text(3)]
    ids = np.full((2, SEQ), PAD, np.int64)
    mask = np.zeros((2, SEQ), np.int64)
    for i, s in enumerate(samples):
        ids[i, SEQ - len(s):] = s
        mask[i, SEQ - len(s):] = 1
    nhwc, nchw = hf.random_pixels(3, config.vision_config.image_size, seed=seed)
    return ids, mask, nhwc, nchw


@SCAN
@pytest.mark.parametrize("name", list(LLAVA_CASES))
def test_llava_logits(llava_models, name, scan):
    model, path = llava_models(name)
    ids, mask, nhwc, nchw = llava_batch(model.config, seed=5)
    assert (ids == model.config.image_token_index).sum() == 3 * tokens_per_image(model.config)
    ref = torch_logits(model, ids, mask, pixel_values=nchw)
    ours = jax_logits(path, scan, ids, mask, pixel_values=nhwc)
    assert_close(f"{name}/{'scan' if scan else 'unrolled'}", ours, ref, valid=mask)


@pytest.mark.parametrize("delta", [-1, 1])
def test_llava_image_token_count_mismatch(llava_models, delta):
    """One image token too few / too many for 3 images: a ValueError naming both counts
    (HF refuses the same input)."""
    model, path = llava_models("llava-llama-layer-2")
    n = tokens_per_image(model.config)
    tok = model.config.image_token_index
    ids, mask, nhwc, nchw = llava_batch(model.config, seed=5)
    if delta < 0:
        ids[1, np.flatnonzero(ids[1] == tok)[-1]] = 7
    else:
        ids[0, 1] = tok
    assert (ids == tok).sum() == 3 * n + delta
    with pytest.raises(ValueError, match="do not match"):
        torch_logits(model, ids, mask, pixel_values=nchw)
    ours, params = mllm_jax.load_hf(path)
    with pytest.raises(ValueError) as err:  # un-jitted: the check needs concrete input_ids
        ours.apply({"params": params}, jnp.asarray(ids), pixel_values=jnp.asarray(nhwc),
                   attention_mask=jnp.asarray(mask))
    msg = str(err.value)
    assert f"{3 * n + delta} image tokens" in msg and f"{3 * n} features" in msg, msg
