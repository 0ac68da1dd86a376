"""OPT as a decoder family: tiny random `OPTForCausalLM`s (pre-LN with `project_in` /
`project_out` and a tied head; OPT-350m's post-LN with an untied head; no biases, no norm
parameters, GELU and no final norm) saved with `save_pretrained`, loaded with
`mllm_jax.load_hf` and compared in float32 on LEFT-padded batches; `save_hf` round trips
bitwise; greedy and beam-search tokens equal HF `generate`; scanned layers equal unrolled.

Run with `-s` to see the measured logit errors.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

import mllm_jax
from hf_factories import randomize_extras_  # tests/ is on sys.path (pytest rootdir)
from mllm_jax.infer import generate as gen
from mllm_jax.models import registry
from mllm_jax.models.decoders import opt

ATOL = 1e-4
VOCAB, PAD, BOS, EOS = 100, 1, 2, 2  # OPT's own special ids
NEW = 8
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
            num_attention_heads=4, max_position_embeddings=48, init_std=0.3,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
CASES = {
    # OPT-125m / 2.7b shape, but with the 350m-style projections; tied head.
    "pre_ln_proj_tied": dict(word_embed_proj_dim=32),
    # OPT-350m: LayerNorm after each block, no final norm, projections; untied head.
    "post_ln_proj_untied": dict(word_embed_proj_dim=32, do_layer_norm_before=False,
                                tie_word_embeddings=False),
    # Everything else non-default: no biases, no norm parameters, GELU, no final norm.
    "pre_ln_plain_untied": dict(enable_bias=False, layer_norm_elementwise_affine=False,
                                activation_function="gelu", _remove_final_layer_norm=True,
                                tie_word_embeddings=False),
}
GENERATING = ("pre_ln_proj_tied", "post_ln_proj_untied")
ERRORS = {}


def build_opt(seed=0, **overrides):
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**{**BASE, **overrides}))
    return randomize_extras_(model, seed=seed + 1).eval()


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if ERRORS:
        print("\nmax |logits_jax - logits_torch| on real tokens per case:")
        for case, err in sorted(ERRORS.items()):
            print(f"  {case:<24} {err:.3e}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{case: (HF model reloaded from disk, directory)}."""
    out = {}
    for name, overrides in CASES.items():
        path = str(tmp_path_factory.mktemp(name))
        # Seed 12: greedy continuations of the test prompts are not one token repeated.
        build_opt(seed=12, **overrides).save_pretrained(path)
        out[name] = (OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path)
    return out


@functools.lru_cache(maxsize=None)
def _load(path, scan=False):
    return mllm_jax.load_hf(path, scan_layers=scan)


def left_pad(samples):
    s = max(len(x) for x in samples)
    ids = np.full((len(samples), s), PAD, np.int64)
    mask = np.zeros((len(samples), s), np.int64)
    for i, x in enumerate(samples):
        ids[i, s - len(x):] = x
        mask[i, s - len(x):] = 1
    return ids, mask


def prompts(seed=0, lengths=(11, 6, 8)):
    rs = np.random.RandomState(seed)
    return left_pad([[BOS] + list(rs.randint(3, VOCAB, n - 1)) for n in lengths])


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(mask)).logits.numpy()


def max_error(ours, ref, mask):
    return float(np.abs(np.asarray(ours, np.float32) - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf_on_left_padded_batch(models, case):
    ref, path = models[case]
    ids, mask = prompts()
    model, params = _load(path)
    ours = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    expected = torch_logits(ref, ids, mask)
    err = ERRORS[case] = max_error(ours, expected, mask)
    assert err <= ATOL, f"{case}: max abs error {err:.3e} > {ATOL}"
    # Left padding changes no logit: a prompt alone gives what it gives in the batch.
    n = int(mask[1].sum())
    alone = model.apply({"params": params}, jnp.asarray(ids[1:2, -n:]))
    assert max_error(alone, np.asarray(ours)[1:2, -n:], np.ones((1, n))) <= ATOL


def test_cases_are_what_they_claim(models):
    """The checkpoints hold what each case is about (projections, norms, biases, head)."""
    keys = {c: set(models[c][0].state_dict()) for c in CASES}
    tied, post, plain = (keys[c] for c in ("pre_ln_proj_tied", "post_ln_proj_untied",
                                           "pre_ln_plain_untied"))
    assert "model.decoder.project_in.weight" in tied
    assert "model.decoder.final_layer_norm.bias" in tied
    assert "model.decoder.project_out.weight" in post
    assert not any(k.startswith("model.decoder.final_layer_norm") for k in post | plain)
    assert not any(k.endswith(".bias") or "layer_norm" in k for k in plain)
    shapes = {k: v.shape for k, v in models["pre_ln_proj_tied"][0].state_dict().items()}
    assert shapes["model.decoder.embed_positions.weight"] == (BASE["max_position_embeddings"]
                                                              + 2, BASE["hidden_size"])
    _, params = _load(models["pre_ln_proj_tied"][1])
    assert "lm_head" not in params
    _, params = _load(models["post_ln_proj_untied"][1])
    assert params["lm_head"]["kernel"].shape == (32, VOCAB)


@pytest.mark.parametrize("case", ["pre_ln_proj_tied", "post_ln_proj_untied"])
def test_scanned_equals_unrolled(models, case):
    _, path = models[case]
    ids, mask = prompts(seed=1)
    unrolled, p0 = _load(path, False)
    scanned, p1 = _load(path, True)
    assert "layers" in p1["model"]["decoder"] and "layers_0" not in p1["model"]["decoder"]
    a = unrolled.apply({"params": p0}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    b = scanned.apply({"params": p1}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert max_error(a, np.asarray(b), mask) <= ATOL


def test_save_hf_round_trip_is_bitwise(models, tmp_path):
    for case in CASES:
        ref, path = models[case]
        model, params = _load(path)
        out = mllm_jax.save_hf(model, params, tmp_path / case)
        back, info = OPTForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                    output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                       ), (case, info)
        assert _same_config(back.config, ref.config), case
        theirs, ours = ref.state_dict(), back.state_dict()
        assert set(theirs) == set(ours), case
        for k, v in theirs.items():
            assert torch.equal(v, ours[k]), (case, k)


def _same_config(a, b):
    fields = list(opt.OPT_DEFAULTS) + ["_remove_final_layer_norm"]
    return all(getattr(a, opt.HF_NAMES.get(k, k), None) == getattr(b, opt.HF_NAMES.get(k, k),
                                                                    None) for k in fields)


def hf_generate(model, ids, mask, eos=EOS, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("case", GENERATING)
def test_greedy_matches_hf(models, case):
    ref, path = models[case]
    ids, mask = prompts(seed=2)
    expected = hf_generate(ref, ids, mask)
    assert len(set(expected[0].tolist())) > NEW // 2, expected  # not degenerate
    model, params = _load(path)
    ours = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                        pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("case,scan", [("pre_ln_proj_tied", False),
                                       ("post_ln_proj_untied", True)])
def test_beam_search_matches_hf(models, case, scan):
    """3 beams and a length penalty; EOS ids taken from the free search, so hypotheses
    finish at different lengths."""
    ref, path = models[case]
    ids, mask = prompts(seed=5)
    free = hf_generate(ref, ids, mask, num_beams=3)
    eos = [int(free[0, 2]), int(free[1, 4])]
    kw = dict(num_beams=3, length_penalty=0.6)
    expected = hf_generate(ref, ids, mask, eos=eos, **kw)
    model, params = _load(path, scan)
    ours = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=PAD, **kw)
    np.testing.assert_array_equal(ours, expected)
    greedy = hf_generate(ref, ids, mask, eos=eos)
    assert ours.shape != greedy.shape or (ours != greedy).any()  # beams change something


def test_embed_is_before_project_in(models):
    """`embed` gives the word embeddings (word_embed_proj_dim wide), which `__call__` takes as
    inputs_embeds: the path composed models (BLIP-2) merge their features into."""
    ref, path = models["pre_ln_proj_tied"]
    model, params = _load(path)
    ids, mask = prompts(seed=3)
    embeds = model.apply({"params": params}, jnp.asarray(ids), method="embed")
    assert embeds.shape[-1] == 32
    np.testing.assert_array_equal(
        np.asarray(embeds), ref.model.decoder.embed_tokens(torch.from_numpy(ids)).detach())
    via_embeds = model.apply({"params": params}, inputs_embeds=embeds,
                             attention_mask=jnp.asarray(mask))
    direct = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(via_embeds), np.asarray(direct))


def test_explicit_positions_and_segments(models):
    """Packed training: explicit position_ids restarting per segment and segment_ids keeping
    the segments apart give each packed sequence the logits it has alone."""
    _, path = models["pre_ln_proj_tied"]
    model, params = _load(path)
    ids, mask = prompts(seed=4, lengths=(5, 6, 11))
    a, b = ids[0, -5:], ids[1, -6:]
    packed = ids.copy()
    packed[0] = np.concatenate([a, b])
    pos = np.tile(np.arange(11), (3, 1))
    pos[0] = np.concatenate([np.arange(5), np.arange(6)])
    seg = np.ones((3, 11), np.int32)
    seg[0, 5:] = 2
    out = model.apply({"params": params}, jnp.asarray(packed), segment_ids=jnp.asarray(seg),
                      position_ids=jnp.asarray(pos))
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                   attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(out[0, :5], alone[0, -5:], atol=ATOL)
    np.testing.assert_allclose(out[0, 5:], alone[1, -6:], atol=ATOL)
    np.testing.assert_allclose(out[2], alone[2], atol=ATOL)


def test_defaults_are_transformers_defaults():
    theirs = OPTConfig()
    for k, v in opt.OPT_DEFAULTS.items():
        want = getattr(theirs, opt.HF_NAMES.get(k, k))
        if k == "word_embed_proj_dim":  # OPTConfig resolves None to hidden_size
            want = None if want == theirs.hidden_size else want
        assert v == want, (k, v, want)
    ours = opt.text_from_hf({"model_type": "opt"})
    assert ours.word_embed_proj_dim == theirs.word_embed_proj_dim == ours.hidden_size
    back = OPTConfig(**opt.text_to_hf(ours))
    for k in opt.OPT_DEFAULTS:
        name = opt.HF_NAMES.get(k, k)
        assert getattr(back, name) == getattr(theirs, name), k


def test_load_hf_reads_an_opt_directory(models):
    _, path = models["post_ln_proj_untied"]
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "opt"
    model, params = _load(path)
    assert model.cfg.model_type == "causal_lm" and model.cfg.text.model_type == "opt"
    assert not model.cfg.text.do_layer_norm_before
    assert "opt" in registry.family_for_hf("opt")[1].hf_model_types()
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n == sum(p.numel() for p in models["post_ln_proj_untied"][0].parameters())


@pytest.mark.parametrize("field,value", [("num_attention_heads", 5), ("ffn_dim", 0),
                                         ("activation_function", "swiglu"),
                                         ("do_layer_norm_before", "yes"),
                                         ("_remove_final_layer_norm", 1),
                                         ("num_hidden_layers", 100000),
                                         ("word_embed_proj_dim", -1), ("eos_token_id", -2)])
def test_bad_config_names_the_field(tmp_path, field, value):
    hf = {"model_type": "opt", **{k: v for k, v in BASE.items() if k != "init_std"},
          field: value}
    with pytest.raises(registry.InvalidConfigError, match=field):
        opt.text_from_hf(hf, "x/config.json")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(registry.InvalidConfigError, match=f"config.json.*{field}"):
        mllm_jax.load_hf(tmp_path)


def test_flops_count_matmuls():
    t = opt.text_from_hf({"model_type": "opt", **{k: v for k, v in BASE.items()
                                                  if k != "init_std"},
                          "word_embed_proj_dim": 32})
    s, d, f, w = 10, 64, 96, 32
    layer = 2 * s * (4 * d * d + 2 * d * f) + 4 * s * s * d
    assert opt.text_forward_flops(t, s) == 2 * layer + 4 * s * d * w + 2 * s * w * VOCAB
