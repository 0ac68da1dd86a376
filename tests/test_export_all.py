"""`mllm-jax convert orbax-to-hf` for every architecture the converter supports: the export
loads in transformers' own class, with no missing, unexpected or mismatched key, and gives
the logits of mllm_jax's model loaded from the orbax checkpoint within 1e-4 in float32
(CLIP vision: its last hidden state and pooled output).

Most cases start from a tiny random-initialized transformers model saved with
`save_pretrained` and run `mllm-jax convert hf-to-orbax HF ORBAX`, then `mllm-jax convert
orbax-to-hf ORBAX OUT`, in-process. The `/save_orbax` cases start from our side: random
parameters for the tiny-llava preset, and for a tiny InstructBLIP / Flan-T5 config built
with mllm_jax's config functions, written by `save_orbax`, so that the export runs on
weights and configs that never came from HF. Cases of equal sizes share compiled programs.

Run with `-s` to see the measured differences.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_blip2_factories as F  # tests/ is on sys.path (pytest rootdir)
import hf_factories as hf
import mllm_jax
from mllm_jax import presets
from mllm_jax.cli import main
from mllm_jax.models import registry  # (importing mllm_jax registers the families)

TOL = 1e-4
DIFFS = {}  # case -> max |difference|, printed at module teardown


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if DIFFS:
        width = max(map(len, DIFFS))
        print("\nmax |transformers(orbax-to-hf export) - mllm_jax(orbax)| per architecture:")
        for case, diff in DIFFS.items():
            print(f"  {case:<{width}}  {diff:.2e}")


# ---- tiny HF models ------------------------------------------------------------------------

T5_SIZES = dict(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                num_decoder_layers=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=12, layer_norm_epsilon=1e-5, dropout_rate=0.0,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def build_t5(flan: bool, seed: int = 0):
    """Flan-T5 (gated GELU, its own head, no output scaling) or original T5 (ReLU, head tied
    to `shared`, decoder output scaled); norm scales random."""
    torch.manual_seed(seed)
    cfg = (transformers.T5Config(**T5_SIZES, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False) if flan
           else transformers.T5Config(**T5_SIZES, feed_forward_proj="relu"))
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        if flan:  # transformers 5 ties lm_head to `shared` unless the checkpoint has its own
            model.lm_head.weight = torch.nn.Parameter(0.5 * torch.randn(T5_SIZES["vocab_size"],
                                                                        T5_SIZES["d_model"]))
            model.all_tied_weights_keys.pop("lm_head.weight")
    return model


def build_opt(seed: int = 0):
    """OPT-350m's layout: `project_in` / `project_out`, post-LayerNorm, untied head."""
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=hf.TEXT_DEFAULTS["vocab_size"], hidden_size=64,
                                 ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                 word_embed_proj_dim=32, do_layer_norm_before=False,
                                 tie_word_embeddings=False, max_position_embeddings=64,
                                 init_std=0.3, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return hf.randomize_extras_(transformers.OPTForCausalLM(cfg), seed=seed + 1).eval()


# ---- inputs (numpy, HF layout: pixels NCHW) ------------------------------------------------

def text_batch(vocab, pad, length=10, seed=0):
    """Two sequences, the second left padded by 3."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab - 1, (2, length))
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = pad, 0
    return dict(input_ids=ids, attention_mask=mask)


def causal_inputs(cfg):
    return text_batch(cfg.vocab_size, cfg.pad_token_id)


def t5_inputs(cfg):
    batch = text_batch(cfg.vocab_size, cfg.pad_token_id)
    batch["input_ids"], batch["attention_mask"] = (a[:, ::-1].copy() for a in
                                                   (batch["input_ids"], batch["attention_mask"]))
    batch.update(t5_decoder_inputs(cfg.vocab_size, cfg.decoder_start_token_id))
    return batch


def t5_decoder_inputs(vocab, start):
    """The decoder's start token, then a few ids; the second row right padded."""
    ids = np.random.RandomState(1).randint(2, vocab - 1, (2, 5))
    ids[:, 0] = start
    mask = np.ones_like(ids)
    ids[1, 3:], mask[1, 3:] = 0, 0
    return dict(decoder_input_ids=ids, decoder_attention_mask=mask)


def pixels(n, size, seed=0):
    return np.random.RandomState(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def clip_inputs(cfg):
    return dict(pixel_values=pixels(2, cfg.image_size))


def llava_inputs(cfg):
    text, n_img = cfg.text_config, cfg.image_seq_length
    ids = np.random.RandomState(2).randint(3, text.vocab_size - 1, (1, 6 + n_img))
    ids[0, 0] = text.bos_token_id
    ids[0, 2:2 + n_img] = cfg.image_token_index
    return dict(input_ids=ids, attention_mask=np.ones_like(ids),
                pixel_values=pixels(1, cfg.vision_config.image_size))


def blip2_inputs(family, text):
    def make(cfg):
        batch = F.inputs(family, text)
        if text == "t5":
            batch.update(t5_decoder_inputs(cfg.text_config.vocab_size, 0))
        return batch
    return make


# ---- the architectures ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arch:
    build: Callable  # () -> torch model (HF-born) or our model config (save_orbax-born)
    hf_class: type  # what transformers loads the export with
    inputs: Callable  # (HF config) -> {name: numpy array}, HF layout
    model_type: str  # our model_type
    hf_type: Optional[str] = None  # HF's config.json model_type (None: from_ours)
    from_ours: bool = False  # the orbax checkpoint is written by save_orbax, not converted
    compared: Optional[str] = "attention_mask"  # the mask of the compared positions


# BLIP-2 / InstructBLIP: hf_blip2_factories' sizes with one vision and one LLM layer (the
# Q-Former keeps two: cross-attention in the first only).
BLIP_VISION = dict(F.VISION, num_hidden_layers=1)
BLIP_TEXT = {"opt": dict(F.TEXT["opt"], num_hidden_layers=1),
             "llama": dict(F.TEXT["llama"], num_hidden_layers=1),
             "t5": dict(F.TEXT["t5"], num_layers=1, num_decoder_layers=1)}


def build_blip2(family, text, seed=0):
    """A float32 Blip2/InstructBlipForConditionalGeneration, every parameter random."""
    return F.build(family, text, seed, vision=BLIP_VISION, text_config=BLIP_TEXT[text])


def tiny_instructblip_flan_t5():
    """Our config of a tiny InstructBLIP / Flan-T5, from mllm_jax's own config functions
    (the sizes of `build_blip2("instructblip", "t5")`, so that the compiled programs are
    shared)."""
    from mllm_jax.models.blip2 import blip2_config
    from mllm_jax.models.connectors.qformer import qformer_config
    from mllm_jax.models.decoders.t5_config import t5_text_config
    from mllm_jax.models.encoders.eva import eva_vision_config
    v, q, t = BLIP_VISION, F.QFORMER, BLIP_TEXT["t5"]
    vision = eva_vision_config(**{k: v[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "image_size", "patch_size", "layer_norm_eps", "hidden_act")})
    qformer = qformer_config(model_type="instructblip_qformer",
                             num_query_tokens=F.NUM_QUERIES,
                             encoder_hidden_size=v["hidden_size"], **q)
    text = t5_text_config(vocab_size=t["vocab_size"], hidden_size=t["d_model"],
                          head_dim=t["d_kv"], intermediate_size=t["d_ff"],
                          num_hidden_layers=t["num_layers"],
                          num_decoder_layers=t["num_decoder_layers"],
                          num_attention_heads=t["num_heads"],
                          relative_attention_num_buckets=t["relative_attention_num_buckets"],
                          relative_attention_max_distance=t["relative_attention_max_distance"],
                          feed_forward_proj=t["feed_forward_proj"], tie_word_embeddings=False,
                          scale_decoder_outputs=False)
    return blip2_config("instructblip", vision=vision, text=text, projector=qformer,
                        image_token_index=F.IMAGE_TOKEN)


def causal(model_type, **overrides):
    return Arch(lambda: hf.build_causal_lm(model_type, **overrides),
                transformers.AutoModelForCausalLM, causal_inputs, "causal_lm", model_type)


HF_BLIP_TYPES = {"blip2": "blip-2", "instructblip": "instructblip"}


def blip2_arch(family, text):
    return Arch(lambda: build_blip2(family, text), F.CLASSES[family][1],
                blip2_inputs(family, text), family, HF_BLIP_TYPES[family],
                compared="decoder_attention_mask" if text == "t5" else "attention_mask")


# The tiny-llava preset's sizes (the HF-born LLaVA and the preset share compiled programs).
LLAVA_TEXT = dict(vocab_size=256, max_position_embeddings=512)

ARCHS = {
    "llama": causal("llama"),
    "mistral": causal("mistral", sliding_window=4),  # the window < the 10 tokens
    "qwen2": causal("qwen2"),
    "opt": Arch(build_opt, transformers.AutoModelForCausalLM, causal_inputs, "causal_lm",
                "opt"),
    "t5": Arch(lambda: build_t5(flan=False), transformers.T5ForConditionalGeneration,
               t5_inputs, "seq2seq_lm", "t5", compared="decoder_attention_mask"),
    "flan-t5": Arch(lambda: build_t5(flan=True), transformers.T5ForConditionalGeneration,
                    t5_inputs, "seq2seq_lm", "t5", compared="decoder_attention_mask"),
    "clip-vision": Arch(hf.build_clip_vision, transformers.CLIPVisionModel, clip_inputs,
                        "clip_vision", "clip_vision_model", compared=None),
    "llava": Arch(lambda: hf.build_llava(text_overrides=LLAVA_TEXT),
                  transformers.LlavaForConditionalGeneration, llava_inputs, "llava", "llava"),
    "blip2-opt": blip2_arch("blip2", "opt"),
    "blip2-flan-t5": blip2_arch("blip2", "t5"),
    "instructblip-vicuna": blip2_arch("instructblip", "llama"),
    "instructblip-flan-t5": blip2_arch("instructblip", "t5"),
    # Parameters and configs that never came from HF: save_orbax writes the checkpoint.
    "tiny-llava-preset/save_orbax": Arch(lambda: presets.get("tiny-llava"),
                                         transformers.LlavaForConditionalGeneration,
                                         llava_inputs, "llava", from_ours=True),
    "instructblip-flan-t5/save_orbax": Arch(
        tiny_instructblip_flan_t5, transformers.InstructBlipForConditionalGeneration,
        blip2_inputs("instructblip", "t5"), "instructblip", from_ours=True,
        compared="decoder_attention_mask"),
}


# Families whose HF export is tested in their own file (`save_hf`, the function
# `convert orbax-to-hf` ends in; there with inputs of their own kind: anyres views, patch
# grids), with the HF model_types those tests write: family -> (test file, test, types).
EXPORTED_ELSEWHERE = {
    "siglip_vision": ("test_siglip", "test_vision_save_hf_round_trip",
                      {"siglip_vision_model"}),
    "llava_next": ("test_llava_next", "test_round_trip_is_bitwise", {"llava_next"}),
    "qwen2_vl": ("test_qwen2_vl", "test_hf_round_trip_is_bitwise", {"qwen2_vl"}),
    "qwen2_5_vl": ("test_qwen2_vl", "test_qwen2_5_vl_window_attention_logits_and_round_trip",
                   {"qwen2_5_vl"}),
}


def test_every_supported_architecture_is_covered():
    """Every composed family the registry can export, and every HF model_type it reads
    (and so writes), has a case here or a named round-trip test in its own file."""
    import importlib
    exported = {name for name, fam in registry.MODELS.items() if fam.to_hf is not None
                and fam.module.__module__.startswith("mllm_jax.")}  # not other tests' toys
    assert exported == {a.model_type for a in ARCHS.values()} | set(EXPORTED_ELSEWHERE)
    for module, test, _ in EXPORTED_ELSEWHERE.values():
        assert callable(getattr(importlib.import_module(module), test, None)), (module, test)
    readable = {t for name, fam in registry.MODELS.items() if name in exported
                for t in fam.hf_model_types()}
    covered = {a.hf_type for a in ARCHS.values() if not a.from_ours}
    covered |= {t for _, _, types in EXPORTED_ELSEWHERE.values() for t in types}
    # "clip" / "siglip": a full CLIP / SigLIP checkpoint, read as its vision tower (written
    # as CLIPVisionModel / SiglipVisionModel).
    assert readable - {"clip", "siglip"} == covered, sorted(readable ^ covered)
    # BLIP-2 / InstructBLIP: the LLMs of the published checkpoints.
    assert {k for k in ARCHS if k.startswith(("blip2", "instructblip")) and "/" not in k} == {
        "blip2-opt", "blip2-flan-t5", "instructblip-vicuna", "instructblip-flan-t5"}


# ---- the test ------------------------------------------------------------------------------

def random_params(model, seed=0):
    """Random parameters for our model's own tree (shapes from `abstract_params`): norm
    scales 1 + N(0, 0.1), every other tensor N(0, 0.1), so that a dropped, transposed or
    swapped tensor changes the logits."""
    rs = np.random.RandomState(seed)

    def draw(path, leaf):
        assert jnp.issubdtype(leaf.dtype, jnp.floating), (path, leaf.dtype)
        x = 0.1 * rs.standard_normal(leaf.shape)
        return (x + (path[-1].key == "scale")).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, mllm_jax.abstract_params(model))


def load_exported(cls, directory):
    model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], (kind, info[kind])
    return model.eval()


def hf_outputs(model, batch):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()})
    if isinstance(model, transformers.CLIPVisionModel):
        return {"last_hidden_state": out.last_hidden_state.numpy(),
                "pooler_output": out.pooler_output.numpy()}
    return {"logits": out.logits.numpy()}


def jax_outputs(model, params, batch):
    kw = {k: jnp.asarray(v.transpose(0, 2, 3, 1) if k == "pixel_values" else v)
          for k, v in batch.items()}
    # One compiled forward (op-by-op dispatch is slower).
    out = jax.jit(model.apply)({"params": params}, **kw)
    if isinstance(out, dict):  # the CLIP tower
        return {k: np.asarray(out[k]) for k in ("last_hidden_state", "pooler_output")}
    return {"logits": np.asarray(out)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_orbax_to_hf_export_matches_jax(arch, tmp_path):
    spec = ARCHS[arch]
    orbax_dir, out = str(tmp_path / "orbax"), str(tmp_path / "hf_out")
    if spec.from_ours:
        model = mllm_jax.build_model(spec.build())
        mllm_jax.save_orbax(model, random_params(model), orbax_dir)
    else:
        source = hf.save(spec.build(), tmp_path / "hf")
        assert main(["convert", "hf-to-orbax", source, orbax_dir]) == 0
    assert main(["convert", "orbax-to-hf", orbax_dir, out]) == 0

    exported = load_exported(spec.hf_class, out)
    model, params = mllm_jax.load_orbax(orbax_dir)
    assert model.cfg.model_type == spec.model_type
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    batch = spec.inputs(exported.config)
    want, got = hf_outputs(exported, batch), jax_outputs(model, params, batch)
    assert sorted(got) == sorted(want)
    compared = batch[spec.compared].astype(bool) if spec.compared else None
    worst = 0.0
    for name in want:
        assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
        # Outputs of O(1): an absolute tolerance of 1e-4 means something.
        assert np.abs(want[name]).max() > 0.5, (name, np.abs(want[name]).max())
        diff = np.abs(got[name] - want[name])
        worst = max(worst, float((diff if compared is None else diff[compared]).max()))
    DIFFS[arch] = worst
    assert np.isfinite(worst) and worst <= TOL, f"{arch}: max |difference| {worst:.2e}"
