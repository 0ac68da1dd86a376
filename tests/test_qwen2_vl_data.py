"""Qwen2-VL's image processor (`data.qwen2_vl_image`) against transformers'
`Qwen2VLImageProcessorPil` (what `AutoImageProcessor` gives here: torchvision is not
installed): patches and grids for several sizes and PIL modes, the pixel bounds read from
preprocessor_config.json as transformers 4 and 5 write them, and merged-token counts equal to
the family's `tokens_per_image`."""
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, Qwen2VLImageProcessorPil

from mllm_jax.data import qwen2_vl_image as qimg
from mllm_jax.models import registry
from mllm_jax.models.qwen2_vl import qwen2_vl_config, qwen2_vl_vision_config

TINY = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8 * 2,
            max_pixels=8 * 8 * 30)
# (width, height): odd sides, tiny, elongated both ways, beyond max_pixels.
SIZES = [(37, 23), (23, 37), (64, 64), (3, 2), (1, 1), (150, 1), (7, 300), (400, 300)]
MODES = ["RGB", "RGBA", "L", "LA", "P"]


def make_image(mode, w, h, seed=0):
    rng = np.random.default_rng([seed, w, h, len(mode)])
    if mode == "P":
        image = Image.frombytes("P", (w, h), rng.integers(0, 16, (h, w), np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        return image
    bands = len(mode)
    arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    if "A" in mode:
        arr[..., -1].flat[:3] = (0, 255, 128)[:arr[..., -1].size]
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)


def hf_out(processor, images):
    out = processor(images=images, return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def tiny_model_config(**bounds):
    return qwen2_vl_config(vision=qwen2_vl_vision_config(
        patch_size=4, spatial_merge_size=2, temporal_patch_size=2, hidden_size=64,
        min_pixels=bounds.get("min_pixels", TINY["min_pixels"]),
        max_pixels=bounds.get("max_pixels", TINY["max_pixels"])))


@pytest.mark.parametrize("mode", MODES)
def test_patches_and_grids_equal_hf(mode):
    hf = Qwen2VLImageProcessorPil(**TINY)
    ours = qimg.Qwen2VLImageConfig(**TINY)
    cfg = tiny_model_config()
    for w, h in SIZES:
        image = make_image(mode, w, h)
        want, want_grid = hf_out(hf, image)
        got, grid = qimg.preprocess(image, ours)
        assert grid.tolist() == want_grid[0].tolist(), (mode, w, h)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{mode} {w}x{h}")
        assert grid[1] * grid[2] // 4 == registry.tokens_per_image(cfg, (h, w))
        assert qimg.merged_tokens(h, w, ours) == registry.tokens_per_image(cfg, (h, w))


def test_default_processor_large_image_and_batch():
    """HF's defaults (patch 14, merge 2, CLIP mean / std, 56*56 .. 28*28*1280 pixels): a
    1300x900 image beyond max_pixels, with others in one batch; the 7B preset's token
    counts."""
    hf = Qwen2VLImageProcessorPil()
    images = [make_image("RGB", 1300, 900), make_image("RGBA", 61, 45), make_image("L", 30, 500)]
    want, want_grid = hf_out(hf, images)
    got = qimg.preprocess_batch(images, qimg.Qwen2VLImageConfig())
    np.testing.assert_array_equal(got["image_grid_thw"], want_grid)
    np.testing.assert_allclose(got["pixel_values"], want, atol=1e-5, rtol=0)
    assert int(np.prod(want_grid[0])) * 14 * 14 <= 28 * 28 * 1280 < 1300 * 900
    preset = registry.MODELS.get("qwen2_vl").config()
    for image, grid in zip(images, want_grid):
        assert registry.tokens_per_image(preset, (image.height, image.width)) == \
            grid[1] * grid[2] // 4


def test_refuses_beyond_200_to_1_as_hf():
    with pytest.raises(ValueError, match="aspect ratio"):
        qimg.preprocess(make_image("RGB", 201, 1), qimg.Qwen2VLImageConfig(**TINY))
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen2VLImageProcessorPil(**TINY)(images=make_image("RGB", 201, 1))


@pytest.mark.parametrize("style", ["transformers4", "transformers5", "processor_config"])
def test_config_read_as_hf_reads_it(tmp_path, style):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    common = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "image_mean": mean,
              "image_std": std, "image_processor_type": "Qwen2VLImageProcessor"}
    if style == "transformers4":  # the published Qwen2-VL files: bounds at the top level
        d = {**common, "min_pixels": 200, "max_pixels": 3000,
             "size": {"shortest_edge": 100, "longest_edge": 99999}}
    else:
        d = {**common, "size": {"shortest_edge": 200, "longest_edge": 3000}}
    name = "preprocessor_config.json"
    if style == "processor_config":
        name, d = "processor_config.json", {"image_processor": d}
    (tmp_path / name).write_text(json.dumps(d))
    ours = qimg.load_qwen2_vl_image_config(tmp_path)
    assert (ours.min_pixels, ours.max_pixels) == (200, 3000)
    assert ours.image_mean == tuple(mean) and ours.patch_size == 4
    hf = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen2VLImageProcessorPil"
    for w, h in [(100, 70), (9, 5)]:
        image = make_image("RGB", w, h)
        want, want_grid = hf_out(hf, image)
        got, grid = qimg.preprocess(image, ours)
        assert grid.tolist() == want_grid[0].tolist()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_partial_size_is_an_error(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 3136}}))
    with pytest.raises(ValueError, match="longest_edge"):
        qimg.load_qwen2_vl_image_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        qimg.load_qwen2_vl_image_config(tmp_path / "nowhere")


def test_for_model_counts_as_tokens_per_image():
    cfg = tiny_model_config(min_pixels=300, max_pixels=5000)
    proc = qimg.Qwen2VLImageConfig.for_model(cfg)
    assert (proc.patch_size, proc.merge_size, proc.min_pixels, proc.max_pixels) == \
        (4, 2, 300, 5000)
    for h, w in [(10, 10), (100, 300), (500, 7), (64, 64)]:
        assert qimg.merged_tokens(h, w, proc) == registry.tokens_per_image(cfg, (h, w))


def test_family_image_inputs_refuse_beyond_200_to_1_as_a_bad_image():
    """The pipeline reports a refused image as a bad record (`ImageRejected`), not an
    error that stops training."""
    from mllm_jax.data.image import IMAGE_ASPECT_RATIO, ImageRejected
    inputs = registry.image_inputs(tiny_model_config())
    assert inputs.sized
    with pytest.raises(ImageRejected) as e:
        inputs.encode(make_image("RGB", 402, 2))
    assert e.value.reason == IMAGE_ASPECT_RATIO
    encoded = inputs.encode(make_image("RGB", 37, 23))
    assert inputs.tokens_of(encoded) == inputs.tokens((23, 37)) == \
        registry.tokens_per_image(tiny_model_config(), (23, 37))
