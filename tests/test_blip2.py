"""BLIP-2 and InstructBLIP against transformers' Blip2ForConditionalGeneration /
InstructBlipForConditionalGeneration: tiny random models saved with `save_pretrained`, read
with `load_hf`; logits of a padded batch (processor layout: image tokens, then the padded
text; InstructBLIP's padded instructions) within 1e-4 in float32; bitwise round trips
through `save_hf` and `from_pretrained`; greedy and beam-search tokens equal to HF
`generate`'s."""
import flax
import jax
import numpy as np
import pytest
import torch

import hf_blip2_factories as F
import mllm_jax
from mllm_jax import sharding
from mllm_jax.convert import hf_config
from mllm_jax.infer.generate import generate
from mllm_jax.models import blip2, blip2_hf  # noqa: F401  (registers the families)
from mllm_jax.models.registry import DECODERS, ENCODERS, UnsupportedModelError

TOL = 1e-4
# (family, LLM): the published pairings (BLIP-2: OPT, Flan-T5; InstructBLIP: Vicuna, Flan-T5)
# and BLIP-2 over LLaMA.
PUBLISHED = [("instructblip", "llama"), ("blip2", "opt"), ("blip2", "t5"),
             ("instructblip", "t5")]
CASES = PUBLISHED + [("blip2", "llama")]

pytestmark = pytest.mark.skipif("eva" not in ENCODERS,
                                reason="needs the eva encoder (BLIP-2's ViT)")


def _available(text):
    return text in DECODERS


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, tmp_path_factory):
    family, text = request.param
    if not _available(text):
        pytest.skip(f"text model_type {text} is not registered")
    hf = F.build(family, text)
    path = tmp_path_factory.mktemp(f"{family}_{text}")
    hf.save_pretrained(path)
    model, params = mllm_jax.load_hf(path)
    return dict(family=family, text=text, hf=hf, path=path, model=model, params=params,
                batch=F.inputs(family, text))


def _decoder_inputs(case):
    """Flan-T5's decoder prompt: the start token, then a few ids (the second row padded)."""
    ids = np.array([[0, 5, 9, 17], [0, 33, 0, 0]], np.int64)
    return ids, (np.arange(4)[None] < np.array([[4], [2]])).astype(np.int64)


def _forward(case, batch):
    extra = {}
    if case["text"] == "t5":
        extra["decoder_input_ids"], extra["decoder_attention_mask"] = _decoder_inputs(case)
    with torch.no_grad():
        want = case["hf"](**F.torch_inputs({**batch, **extra})).logits.numpy()
    j = F.jax_inputs({**batch, **extra})
    if "apply" not in case:  # one compiled forward per model (op-by-op dispatch is slow)
        case["apply"] = jax.jit(case["model"].apply)
    got = case["apply"]({"params": case["params"]}, j.pop("input_ids"), **j)
    return np.asarray(got), want


def test_logits_match_transformers(case):
    got, want = _forward(case, case["batch"])
    assert got.shape == want.shape
    diff = float(np.max(np.abs(got - want)))
    print(f"{case['family']}-{case['text']}: max |logits diff| {diff:.2e}")
    assert diff <= TOL


def test_right_padded_text_matches_transformers(case):
    got, want = _forward(case, F.inputs(case["family"], case["text"], seed=1,
                                        pad_side="right"))
    assert float(np.max(np.abs(got - want))) <= TOL


def test_hf_round_trip_is_bitwise(case, tmp_path):
    model, params = case["model"], case["params"]
    out = mllm_jax.save_hf(model, params, tmp_path / "out")
    cls = type(case["hf"])
    again, info = cls.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    want, got = case["hf"].state_dict(), again.state_dict()
    assert sorted(want) == sorted(got)
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    assert unequal == []
    # ... and our config survives HF's config.json.
    assert hf_config.from_hf(hf_config.to_hf(model.cfg)).to_dict() == model.cfg.to_dict()


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
def test_generate_matches_transformers(case, beams):
    if (case["family"], case["text"]) not in PUBLISHED:
        pytest.skip("generation is checked on the published pairings")
    b = case["batch"]
    lp = -1.0 if beams > 1 else 1.0  # BLIP-2's VQA setting: length_penalty -1
    text = F.TEXT[case["text"]]
    with torch.no_grad():
        want = case["hf"].generate(**F.torch_inputs(b), max_new_tokens=6, do_sample=False,
                                   num_beams=beams, length_penalty=lp).numpy()
    # Decoder-only: HF returns the prompt, then the new tokens; T5: the decoder's start
    # token, then the new tokens.
    want = want[:, 1:] if case["text"] == "t5" else want[:, b["input_ids"].shape[1]:]
    j = F.jax_inputs(b)
    got = generate(case["model"], case["params"], j.pop("input_ids"), j.pop("attention_mask"),
                   j.pop("pixel_values"), max_new_tokens=6, eos_token_id=text["eos_token_id"],
                   pad_token_id=text["pad_token_id"], num_beams=beams, length_penalty=lp, **j)
    np.testing.assert_array_equal(got, want)


def test_every_parameter_maps_through_the_logical_rules(case):
    boxed = mllm_jax.abstract_params(case["model"], boxed=True)
    specs = sharding.param_specs(boxed)
    flat = flax.traverse_util.flatten_dict(specs, sep="/")
    assert any(k.startswith("qformer/") for k in flat)
    assert all(s is not None for s in flat.values())
    assert len(jax.tree.leaves(boxed)) == len(flat)


def test_config_without_image_token_is_refused(case):
    hf = hf_config.to_hf(case["model"].cfg)
    del hf["image_token_index"]
    with pytest.raises(UnsupportedModelError, match="image_token_index"):
        hf_config.from_hf(hf, where="legacy/config.json")


def test_image_token_count_must_match_the_queries(case):
    ids = case["batch"]["input_ids"].copy()
    ids[0, 0] = 5  # one image token fewer than the two images' queries
    feats = np.zeros((2, F.NUM_QUERIES, case["model"].cfg.text.hidden_size), np.float32)
    with pytest.raises(ValueError, match=r"7 image tokens \(id 127\) but 2 image"):
        case["model"].apply({"params": case["params"]}, ids, image_features=feats,
                            method="embed")
