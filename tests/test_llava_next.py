"""LLaVA-NeXT (`llava_next`) against transformers' `LlavaNextForConditionalGeneration`: a tiny
random-initialized model with custom pinpoints, two feature layers and two images of
different aspect ratios in a left-padded batch gives HF's logits (float32, max |diff| <=
1e-4) and HF's greedy tokens; HF -> mllm_jax -> HF is bit for bit; the image tokens of every
pinpoint and many aspect ratios equal HF's processor's count, including image sizes where
HF's double arithmetic picks another pinpoint than exact arithmetic would; the 7B presets
have the parameter counts of the transformers models on the meta device.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessor, LlavaNextProcessor)

import hf_factories as hf
import mllm_jax
from mllm_jax import models, presets
from mllm_jax.convert import hf_config
from mllm_jax.data import image as image_lib
from mllm_jax.infer import generate as gen
from mllm_jax.models import llava_next, llava_next_grid

VOCAB = hf.TEXT_DEFAULTS["vocab_size"]
PAD, BOS, EOS = 0, 1, 2
IMAGE = VOCAB - 1
TILE = 28  # the tower's resolution: 4x4 patches of 7 px
# Non-default pinpoints (height, width), a 3x1 one included.
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
SIZES = [(30, 71), (90, 41)]  # (height, width): one wide, one tall
ATOL = 1e-4


def image_processor():
    return LlavaNextImageProcessor(size={"shortest_edge": TILE},
                                   crop_size={"height": TILE, "width": TILE},
                                   image_grid_pinpoints=PINPOINTS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    config = LlavaNextConfig(
        vision_config=hf.vision_config(), text_config=hf.text_config(initializer_range=0.3),
        image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=[-3, -1], vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=16)
    model = hf.randomize_extras_(LlavaNextForConditionalGeneration(config), seed=4)
    path = hf.save(model.eval(), tmp_path_factory.mktemp("llava_next"))
    ref = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return ref, str(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return mllm_jax.load_hf(checkpoint[1])


@pytest.fixture(scope="module")
def inputs(loaded):
    """HF processor pixels for SIZES, and two left-padded prompts with one image each."""
    model, _ = loaded
    rs = np.random.RandomState(0)
    images = [rs.randint(0, 256, (h, w, 3), np.uint8) for h, w in SIZES]
    out = image_processor()(images, return_tensors="np")
    nchw = out["pixel_values"].astype(np.float32)
    sizes = out["image_sizes"]
    counts = [models.tokens_per_image(model.cfg, tuple(s)) for s in sizes]
    prompts = [[BOS] + list(rs.randint(3, VOCAB - 2, 5)) + [IMAGE] * counts[0]
               + list(rs.randint(3, VOCAB - 2, 4)),
               [BOS] + list(rs.randint(3, VOCAB - 2, 2)) + [IMAGE] * counts[1] + [7]]
    width = max(map(len, prompts))
    ids = np.full((2, width), PAD, np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return dict(ids=ids, mask=mask, nchw=nchw, nhwc=nchw.transpose(0, 1, 3, 4, 2),
                sizes=sizes, images=images, counts=counts)


def test_logits_match_hf(checkpoint, loaded, inputs):
    ref, _ = checkpoint
    model, params = loaded
    assert inputs["counts"][0] != inputs["counts"][1]
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(inputs["ids"]),
                       attention_mask=torch.from_numpy(inputs["mask"]),
                       pixel_values=torch.from_numpy(inputs["nchw"]),
                       image_sizes=torch.from_numpy(inputs["sizes"])).logits.numpy()
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(inputs["ids"], jnp.int32),
                                pixel_values=jnp.asarray(inputs["nhwc"]),
                                image_sizes=jnp.asarray(inputs["sizes"]),
                                attention_mask=jnp.asarray(inputs["mask"], jnp.int32))
    valid = inputs["mask"] == 1
    err = float(np.abs(np.asarray(ours) - expected)[valid].max())
    print(f"\nllava_next max |logits_jax - logits_torch| = {err:.3e}")
    assert err <= ATOL


def test_our_preprocessing_gives_hf_pixels(inputs):
    ours = image_lib.preprocess_batch(inputs["images"], {
        "image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": TILE},
        "crop_size": TILE, "image_grid_pinpoints": PINPOINTS})
    np.testing.assert_array_equal(ours["image_sizes"], inputs["sizes"])
    np.testing.assert_allclose(ours["pixel_values"], inputs["nhwc"], atol=1e-5)


def test_round_trip_is_bitwise(checkpoint, loaded, tmp_path):
    _, path = checkpoint
    model, params = loaded
    out = mllm_jax.save_hf(model, params, tmp_path / "out")
    back, info = LlavaNextForConditionalGeneration.from_pretrained(out,
                                                                   output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    original = load_file(f"{path}/model.safetensors")
    written = load_file(f"{out}/model.safetensors")
    assert "image_newline" in written
    canon = {hf_config.checkpoint_layout(model.cfg)[1].canonical_key(model.cfg, k): v
             for k, v in original.items()}
    assert sorted(canon) == sorted(written)
    for k, v in written.items():
        np.testing.assert_array_equal(v, canon[k], err_msg=k)
    state = back.state_dict()
    np.testing.assert_array_equal(state["model.image_newline"].numpy(),
                                  original.get("model.image_newline",
                                               original.get("image_newline")))


def test_greedy_matches_hf_generate(checkpoint, loaded, inputs):
    ref, _ = checkpoint
    model, params = loaded
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.from_numpy(inputs["ids"]),
                                attention_mask=torch.from_numpy(inputs["mask"]),
                                pixel_values=torch.from_numpy(inputs["nchw"]),
                                image_sizes=torch.from_numpy(inputs["sizes"]),
                                do_sample=False, max_new_tokens=8, eos_token_id=EOS,
                                pad_token_id=PAD)[:, inputs["ids"].shape[1]:].numpy()
    ours = gen.generate(model, params, inputs["ids"], inputs["mask"], inputs["nhwc"],
                        image_sizes=inputs["sizes"], max_new_tokens=8, eos_token_id=EOS,
                        pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)
    with pytest.raises(ValueError, match="image tokens"):
        gen.generate(model, params, inputs["ids"], inputs["mask"], inputs["nhwc"],
                     image_sizes=np.asarray([SIZES[0], (28, 28)]), max_new_tokens=1,
                     eos_token_id=EOS)


def hf_processor_count(size, strategy="default"):
    """LlavaNextProcessor's image tokens for an image of `size` (h, w) (its own arithmetic,
    without a tokenizer)."""
    processor = object.__new__(LlavaNextProcessor)
    processor.image_processor = image_processor()
    processor.patch_size = 7
    processor.num_additional_image_tokens = 1
    n = processor._get_number_of_features(*size, TILE, TILE)
    return n - 1 if strategy == "default" else n


# Sizes where HF's doubles pick another pinpoint than exact arithmetic (found by search
# over 1..1500 for LLaVA-NeXT's default pinpoints), with the tiny tower's pinpoints scaled
# by 12 (336 px tiles), and others: every pinpoint's exact shape, squares, extremes.
QUIRKS = [(567, 1133), (570, 1141), (573, 1145), (600, 1199)]


def test_tokens_per_image_match_hf_processor(loaded):
    model, _ = loaded
    cfg = model.cfg
    sizes = [tuple(p) for p in PINPOINTS] + [(28, 28), (1, 1), (1, 500), (500, 1), (30, 71),
                                            (90, 41), (99, 100), (100, 99), (33, 97),
                                            (1000, 3)]
    rs = np.random.RandomState(1)
    sizes += [tuple(int(x) for x in rs.randint(1, 2000, 2)) for _ in range(60)]
    for size in sizes:
        assert models.tokens_per_image(cfg, size) == hf_processor_count(size), size
    # The default pinpoints at 336 px, in HF's doubles' corner cases.
    big = presets.get("llava-v1.6-vicuna-7b")
    processor = object.__new__(LlavaNextProcessor)
    processor.image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=big.image_grid_pinpoints)
    processor.patch_size, processor.num_additional_image_tokens = 14, 1
    for size in QUIRKS + [(336, 336), (672, 1008), (1, 3000)]:
        assert (models.tokens_per_image(big, size)
                == processor._get_number_of_features(*size, 336, 336) - 1), size


def test_device_layout_equals_host_select_best_resolution():
    """The jitted pinpoint choice equals `data.image.select_best_resolution` (HF's doubles)
    at the corner cases and random sizes."""
    pins = tuple(tuple(p) for p in llava_next.DEFAULT_PINPOINTS)
    rs = np.random.RandomState(2)
    sizes = np.concatenate([np.asarray(QUIRKS), rs.randint(1, 5000, (200, 2))]).astype(np.int32)
    index = jax.jit(lambda s: llava_next_grid.select_best_pinpoint(s[:, 0], s[:, 1], pins))(
        jnp.asarray(sizes))
    chosen = [pins[int(i)] for i in np.asarray(index)]
    assert chosen == [image_lib.select_best_resolution(int(h), int(w), pins)
                      for h, w in sizes]


@pytest.mark.parametrize("name,billions", [("llava-v1.6-mistral-7b", 7.57),
                                           ("llava-v1.6-vicuna-7b", 7.06)])
def test_presets_match_transformers_meta_models(name, billions):
    cfg = presets.get(name)
    model = mllm_jax.build_model(cfg)
    shapes = mllm_jax.abstract_params(model)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    with torch.device("meta"):
        ref = transformers.LlavaNextForConditionalGeneration(
            transformers.LlavaNextConfig(**hf_config.to_hf(cfg)))
    assert ours == sum(p.numel() for p in ref.parameters())
    assert abs(ours / 1e9 - billions) < 0.01 * billions, ours
