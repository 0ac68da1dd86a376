"""Image preprocessing parity with transformers' PIL image processors (CLIP, LLaVA-1.5 pad,
LLaVA-NeXT anyres) on odd sizes and PIL modes; EXIF orientation; unreadable files."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil

from mllm_jax.data.image import (ImageProcessorConfig, ImageReadError, apply_exif_orientation,
                                 load_image_processor_config, preprocess, preprocess_batch,
                                 preprocess_image, read_image, to_rgb)

SIZES = [(37, 23), (23, 37), (64, 64), (1, 50), (300, 17), (50, 1)]  # (width, height)
MODES = ["RGB", "L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16", "I", "F", "1"]
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not CLIP's, so a mix-up of the two shows


def make_image(mode, w, h, seed=0):
    rng = np.random.default_rng([seed, w, h, len(mode)])
    u8 = lambda *shape: rng.integers(0, 256, (h, w) + shape, dtype=np.uint8)
    if mode in ("RGB", "RGBA", "LA"):
        arr = u8(len(mode))
        if mode != "RGB":
            arr[..., -1].flat[:3] = (0, 255, 128)  # fully transparent, opaque, half
        return Image.merge(mode, [Image.fromarray(np.ascontiguousarray(arr[..., i]))
                                  for i in range(len(mode))])
    if mode == "L":
        return Image.fromarray(u8())
    if mode.startswith("P"):
        image = Image.frombytes("P", (w, h), (u8() % 16).tobytes())  # palette indices 0..15
        image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
        if mode == "P+transparency":
            image.info["transparency"] = int(np.asarray(image).flat[0])
        return image
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), u8(4).tobytes())
    if mode == "I;16":  # 0..511: PIL's convert("RGB") clips the top half to 255
        return Image.fromarray(rng.integers(0, 512, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-50, 400, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-20, 300, (h, w)).astype(np.float32))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    raise ValueError(mode)


def tiny_kwargs():
    return dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                image_mean=MEAN, image_std=STD)


@pytest.fixture(scope="module")
def processors():
    """(ours, HF) pairs for the three processor kinds, tiny configs."""
    clip = CLIPImageProcessorPil(**tiny_kwargs())
    llava = LlavaImageProcessorPil(do_pad=True, **tiny_kwargs())
    nxt = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **tiny_kwargs())
    ours = dict(crop=ImageProcessorConfig(mode="crop", **tiny_kwargs()),
                pad=ImageProcessorConfig(mode="pad", **tiny_kwargs()),
                anyres=ImageProcessorConfig(mode="anyres", image_grid_pinpoints=PINPOINTS,
                                            **tiny_kwargs()))
    return {"crop": (ours["crop"], clip), "pad": (ours["pad"], llava),
            "anyres": (ours["anyres"], nxt)}


def hf_pixels(hf, image):
    """HF pixel_values of one image, NCHW -> NHWC (anyres: [views, H, W, 3])."""
    out = np.asarray(hf(images=image, return_tensors="np")["pixel_values"][0])
    return np.moveaxis(out, -3, -1)


@pytest.mark.parametrize("kind", ["crop", "pad", "anyres"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_hf_processors(processors, kind, mode):
    ours_cfg, hf = processors[kind]
    for w, h in SIZES:
        image = make_image(mode, w, h)
        want = hf_pixels(hf, image)
        got = preprocess(image, ours_cfg)
        assert got.dtype == np.float32 and got.shape == want.shape, (mode, w, h)
        assert got.shape[-3:] == (28, 28, 3)
        diff = float(np.max(np.abs(got - want)))
        assert diff <= 1e-5, (kind, mode, w, h, diff)


def test_anyres_layout(processors):
    cfg, _ = processors["anyres"]
    # 37 wide x 23 high fits 28x56 (h, w) best: base view + 2 tiles; 64x64 -> 56x56: base + 4.
    assert preprocess(make_image("RGB", 37, 23), cfg).shape == (3, 28, 28, 3)
    assert preprocess(make_image("RGB", 64, 64), cfg).shape == (5, 28, 28, 3)
    # The base view is the whole image squashed to 28x28, first.
    image = make_image("RGB", 64, 64)
    base = preprocess(image.resize((28, 28), Image.BICUBIC), ImageProcessorConfig(**tiny_kwargs()))
    np.testing.assert_array_equal(preprocess(image, cfg)[0], base)


def test_extreme_aspect_where_hf_fails_still_gets_a_resolution(processors):
    cfg, _ = processors["anyres"]
    out = preprocess(make_image("RGB", 1, 300), cfg)  # every pinpoint keeps int(...) == 0 pixels
    assert out.shape[1:] == (28, 28, 3) and np.isfinite(out).all()


def test_batch_matches_hf_padding_of_views(processors):
    cfg, hf = processors["anyres"]
    images = [make_image("RGB", 37, 23), make_image("RGBA", 64, 64), make_image("L", 23, 37)]
    want = hf(images=images, return_tensors="np")
    got = preprocess_batch(images, cfg)
    np.testing.assert_allclose(got["pixel_values"], np.moveaxis(want["pixel_values"], 2, -1),
                               atol=1e-5)
    np.testing.assert_array_equal(got["image_sizes"], want["image_sizes"])
    cfg, hf = processors["pad"]
    want = hf(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess_batch(images, cfg)["pixel_values"],
                               np.moveaxis(want, 1, -1), atol=1e-5)


def test_rgb_conversion_follows_hf():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(200, 10, 10, 0), (200, 10, 10, 255)])
    # transparent pixels become white (HF's convert_to_rgb), not the hidden colour
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [200, 10, 10]]]
    sixteen = Image.fromarray(np.array([[0, 100, 300, 65535]], np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 100, 255, 255]  # clipped, as PIL
    for mode in MODES:
        assert to_rgb(make_image(mode, 5, 4)).mode == "RGB"


def test_preprocess_image_keeps_its_signature():
    image = make_image("RGB", 50, 37)
    clip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    np.testing.assert_allclose(preprocess_image(image, 28), hf_pixels(clip, image), atol=1e-5)
    llava = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 28},
                                   crop_size={"height": 28, "width": 28})
    np.testing.assert_allclose(preprocess_image(image, 28, mode="pad"), hf_pixels(llava, image),
                               atol=1e-5)
    nxt = LlavaNextImageProcessorPil(size={"shortest_edge": 28},
                                     crop_size={"height": 28, "width": 28},
                                     image_grid_pinpoints=[[28, 56], [56, 28], [56, 56],
                                                           [84, 28], [28, 84]])
    np.testing.assert_allclose(preprocess_image(image, 28, mode="anyres"), hf_pixels(nxt, image),
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["crop", "pad", "anyres"])
def test_config_from_saved_hf_processor(tmp_path, processors, kind):
    ours, hf = processors[kind]
    hf.save_pretrained(tmp_path)
    cfg = load_image_processor_config(tmp_path)
    assert cfg.mode == kind
    assert cfg.to_dict() == ours.to_dict()
    image = make_image("P+transparency", 37, 23)
    np.testing.assert_allclose(preprocess(image, cfg), hf_pixels(hf, image), atol=1e-5)


def test_siglip_processor_resizes_straight_to_its_size(tmp_path):
    """SiglipImageProcessor has no center crop (its saved config has no do_center_crop): a
    saved one reads as a plain resize to `size`, pixel for pixel HF's."""
    from transformers import SiglipImageProcessorPil
    hf = SiglipImageProcessorPil(size={"height": 28, "width": 36})
    hf.save_pretrained(tmp_path)
    cfg = load_image_processor_config(tmp_path)
    assert cfg.mode == "crop" and not cfg.do_center_crop
    for mode in ("RGB", "RGBA", "L"):
        for w, h in SIZES:
            image = make_image(mode, w, h)
            got, want = preprocess(image, cfg), hf_pixels(hf, image)
            assert got.shape == want.shape == (28, 36, 3), (mode, w, h)
            assert float(np.max(np.abs(got - want))) <= 1e-5, (mode, w, h)


def test_config_legacy_fields_and_llava_repo_aspect(tmp_path):
    legacy = {"image_processor_type": "CLIPImageProcessor", "size": 28, "crop_size": 28,
              "resample": 3, "rescale_factor": 0.00392156862745098, "image_mean": list(MEAN),
              "image_std": list(STD), "do_center_crop": True, "feature_extractor_type": "x"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    cfg = load_image_processor_config(tmp_path)
    assert (cfg.mode, cfg.size, cfg.crop_size) == ("crop", {"shortest_edge": 28},
                                                   {"height": 28, "width": 28})
    # original LLaVA repos: aspect handling lives in config.json; pinpoints there are (w, h)
    (tmp_path / "config.json").write_text(json.dumps({"image_aspect_ratio": "pad"}))
    assert load_image_processor_config(tmp_path).mode == "pad"
    (tmp_path / "config.json").write_text(json.dumps(
        {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[28, 56], [28, 84]]}))
    cfg = load_image_processor_config(tmp_path)
    assert cfg.mode == "anyres" and cfg.image_grid_pinpoints == ((56, 28), (84, 28))
    assert load_image_processor_config(tmp_path, mode="crop").mode == "crop"
    # a dict works wherever a config does
    image = make_image("RGB", 37, 23)
    np.testing.assert_array_equal(preprocess(image, dict(legacy, mode="pad")),
                                  preprocess(image, ImageProcessorConfig(mode="pad",
                                                                         **tiny_kwargs())))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_image_processor_config(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        ImageProcessorConfig(mode="anyres")


def exif_png(image, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    arr = make_image("RGB", 37, 23)
    path = tmp_path / "rotated.png"
    path.write_bytes(exif_png(arr, 6))  # 6: stored image must turn 90 degrees clockwise
    raw = read_image(path)
    assert raw.size == (37, 23) and raw.getexif().get(0x0112) == 6
    upright = apply_exif_orientation(raw)
    assert upright.size == (23, 37)
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(np.asarray(arr), k=-1))
    # the whole pipeline uses the upright image, from a path or an opened image alike
    cfg = ImageProcessorConfig(mode="anyres", image_grid_pinpoints=PINPOINTS, **tiny_kwargs())
    want = preprocess(upright, cfg)
    np.testing.assert_array_equal(preprocess(path, cfg), want)
    np.testing.assert_array_equal(preprocess(Image.open(path), cfg), want)
    assert preprocess_batch([path], cfg)["image_sizes"].tolist() == [[37, 23]]
    # and can be switched off
    off = ImageProcessorConfig(mode="anyres", image_grid_pinpoints=PINPOINTS,
                               exif_transpose=False, **tiny_kwargs())
    np.testing.assert_array_equal(preprocess(path, off), preprocess(arr, cfg))


def test_unreadable_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    make_image("RGB", 64, 64).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:200])
    for path in (missing, garbage, truncated):
        with pytest.raises(ImageReadError, match=path.name):
            preprocess_image(path, 28)
        with pytest.raises(OSError, match=str(path)):
            read_image(str(path))

