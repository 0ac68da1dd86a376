"""Training and eval data as untrusted input: images bounded in memory (aspect-ratio limit,
decompression bombs), image paths confined to the image root, TFDS copies read without
importing what their metadata names, and text that cannot be encoded skipped with a reason."""
import json
import os
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from mllm_jax.cli import main
from mllm_jax.data import image as image_lib
from mllm_jax.data import pipeline as P
from mllm_jax.data.llava_json import read_llava_json, read_preference_json
from mllm_jax.data.sources import make_data
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer.batching import Conversation, ImageLoadError, load_pixels
from test_templates import make_hf
from test_train_data import llava_json_config

CROP = 28
IMAGE_CFG = image_lib.ImageProcessorConfig(mode="crop", size={"shortest_edge": CROP},
                                           crop_size=CROP)


def png(path, w, h, seed=0):
    rng = np.random.default_rng([seed, w, h])
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


# ---------------------------------------------------------------- bounded images

@pytest.fixture
def resize_sizes(monkeypatch):
    """The output size of every PIL resize, recorded."""
    sizes, resize = [], Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return sizes


def test_elongated_image_is_refused_naming_the_file(tmp_path):
    wide = png(tmp_path / "wide.png", 6000, 1)
    cfg = image_lib.ImageProcessorConfig(mode="crop", size={"shortest_edge": 336},
                                         crop_size=336)
    with pytest.raises(image_lib.ImageRejected, match="wide.png.*6000x1.*max_aspect_ratio") as e:
        image_lib.preprocess(wide, cfg)
    assert e.value.reason == image_lib.IMAGE_ASPECT_RATIO
    assert isinstance(e.value, ValueError)
    # generate / chat / eval read images through load_pixels: an error naming sample and file
    conv = Conversation([{"from": "human", "value": "<image>\nwhat?"}], [wide], "q7")
    with pytest.raises(ImageLoadError, match="'q7'.*wide.png.*aspect ratio 6000:1"):
        load_pixels(conv, cfg)


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("w,h", [(6000, 1), (1, 6000), (6000, 120)])
def test_without_the_limit_no_intermediate_grows_with_the_aspect(tmp_path, resize_sizes,
                                                                 mode, w, h):
    cfg = image_lib.ImageProcessorConfig(mode=mode, size={"shortest_edge": 336},
                                         crop_size=336, max_aspect_ratio=None)
    out = image_lib.preprocess(png(tmp_path / "long.png", w, h), cfg)
    assert out.shape == (336, 336, 3) and np.isfinite(out).all()
    # Before, 6000x1 was resized to 2016000x336 first (6.7 GB); now at most 64 target squares.
    assert resize_sizes and max(a * b for a, b in resize_sizes) <= 64 * 336 * 336


def test_images_within_the_limit_keep_the_full_resize(tmp_path, resize_sizes):
    # 50:1 is accepted and resized whole, as HF does (tests/test_image.py compares pixels).
    out = image_lib.preprocess(png(tmp_path / "banner.png", 1400, 28), IMAGE_CFG)
    assert out.shape == (CROP, CROP, 3) and resize_sizes == [(1400, 28)]


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    big, bigger = png(tmp_path / "big.png", 40, 40), png(tmp_path / "bigger.png", 100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above, errs above 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the test
        for path in (big, bigger):
            with pytest.raises(image_lib.ImageRejected, match=os.path.basename(path)) as e:
                image_lib.read_image(path)
            assert e.value.reason == image_lib.IMAGE_TOO_LARGE
            assert "MAX_IMAGE_PIXELS" in str(e.value)
        got = P.decode_images([big, bigger], IMAGE_CFG)
    assert [b.reason for b in got] == [P.IMAGE_TOO_LARGE] * 2
    assert "big.png" in got[0].detail


# ---------------------------------------------------------------- training records

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_hf(str(tmp_path_factory.mktemp("tok") / "bl"), "bytelevel")


def ask(q="<image>\nwhat is it?", a="a red cube"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A LLaVA JSON under root/ with good records and hostile ones, and a secret image beside
    root/ that no record may reach."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    root.mkdir()
    secret = png(base / "secret.png", 30, 30, seed=9)
    os.symlink(secret, root / "link.png")
    entries = [{"id": f"good-{k}", "image": png(root / f"g{k}.png", 30, 20, seed=k),
                "conversations": ask()} for k in range(6)]
    for e in entries:
        e["image"] = os.path.basename(e["image"])
    entries += [{"id": f"text-{k}", "conversations": ask("what is it?", f"answer {k}")}
                for k in range(4)]
    png(root / "wide.png", 6000, 1)
    bad = {"dotdot": ("../secret.png", P.OUTSIDE_ROOT),
           "absolute": (secret, P.OUTSIDE_ROOT),
           "symlink": ("link.png", P.OUTSIDE_ROOT),
           "wide": ("wide.png", P.IMAGE_ASPECT_RATIO),
           "nul": ("a\x00b.png", P.UNREADABLE_IMAGE)}
    entries += [{"id": sid, "image": image, "conversations": ask()}
                for sid, (image, _) in bad.items()]
    entries.append({"id": "surrogate", "conversations": ask("what is \ud800 here?")})
    bad["surrogate"] = (None, P.TEXT_NOT_ENCODABLE)
    path = root / "data.json"
    path.write_text(json.dumps(entries))  # "\ud800" is written as valid JSON
    return {"json": str(path), "root": str(root), "bad": bad}


def consume(pipe, n_batches):
    ids = set()
    for _ in range(n_batches):
        batch = next(pipe)
        assert batch["input_ids"].shape == (4, 96)
        ids.update(batch["sample_ids"].tolist())
    return ids


def report_lines(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "data_report.jsonl"))]


def test_hostile_records_are_skipped_counted_and_listed(hostile, tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    pipe = P.LlavaPipeline(read_llava_json(hostile["json"]), tok, IMAGE_CFG, "chatml",
                           global_batch_size=4, max_length=96, max_images=1,
                           image_tokens_per_image=4, num_workers=2, workdir=tmp_path,
                           return_sample_ids=True)
    with pipe:
        ids = consume(pipe, 8)  # 32 samples: more than two passes over the 16 records
        assert ids == {f"good-{k}" for k in range(6)} | {f"text-{k}" for k in range(4)}
        assert pipe.report() == {P.OUTSIDE_ROOT: 3, P.IMAGE_ASPECT_RATIO: 1,
                                 P.TEXT_NOT_ENCODABLE: 1, P.UNREADABLE_IMAGE: 1}
    lines = {e["sample_id"]: e for e in report_lines(tmp_path)}
    assert {sid: e["reason"] for sid, e in lines.items()} == {
        sid: reason for sid, (_, reason) in hostile["bad"].items()}
    assert "../secret.png" in lines["dotdot"]["detail"]
    assert "symlink" in lines["symlink"]["detail"]
    surrogate = lines["surrogate"]["detail"]
    assert "'\\ud800'" in surrogate and "message 0" in surrogate
    counts = json.load(open(tmp_path / "data_report.json"))["counts"]
    assert counts == pipe.report()


def test_allow_absolute_image_paths_from_the_config(hostile, tokenizer_dir, tmp_path):
    def reasons(allow):
        cfg = llava_json_config(hostile["json"], tokenizer_dir, 1, images=1,
                                image_root=hostile["root"], allow_absolute_image_paths=allow)
        cfg.train.global_batch_size = 4
        workdir = tmp_path / str(allow)
        used = set()
        with make_data(cfg, 0, 1, workdir=str(workdir)) as pipe:
            for _ in range(8):
                next(pipe)
                used.update(pipe.last_sample_ids)
        return {e["sample_id"]: e["reason"] for e in report_lines(workdir)}, used

    refused, _ = reasons(False)
    assert {k for k, r in refused.items() if r == P.OUTSIDE_ROOT} == {"dotdot", "absolute",
                                                                       "symlink"}
    allowed, used = reasons(True)
    # absolute paths and symlinks are read where they lead; a relative `..` escape is not
    assert {k for k, r in allowed.items() if r == P.OUTSIDE_ROOT} == {"dotdot"}
    assert {"absolute", "symlink"} <= used


def test_preference_records_with_unencodable_text(tmp_path, tokenizer_dir):
    png(tmp_path / "a.png", 30, 20)
    entries = [{"id": f"p{k}", "image": "a.png", "prompt": "<image>\nwhat is it?",
                "chosen": "a cube", "rejected": "a ball"} for k in range(4)]
    entries.append({"id": "bad", "image": "a.png", "prompt": "<image>\nwhat?",
                    "chosen": "a cube", "rejected": "a \udfff ball"})
    entries.append({"id": "escape", "image": "../a.png", "prompt": "<image>\nwhat?",
                    "chosen": "a cube", "rejected": "a ball"})
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / "prefs.json"
    path.write_text(json.dumps(entries))
    tok = load_tokenizer(tokenizer_dir)
    with P.LlavaPipeline(read_preference_json(path, image_root=tmp_path), tok, IMAGE_CFG,
                         "chatml", global_batch_size=2, max_length=96, max_images=1,
                         image_tokens_per_image=4, num_workers=0, mode="dpo",
                         workdir=tmp_path / "wd") as pipe:
        for _ in range(4):
            assert next(pipe)["chosen_input_ids"].shape == (2, 96)
        assert pipe.report() == {P.OUTSIDE_ROOT: 1, P.TEXT_NOT_ENCODABLE: 1}
    lines = {e["sample_id"]: e for e in report_lines(tmp_path / "wd")}
    assert lines["bad"]["reason"] == P.TEXT_NOT_ENCODABLE
    assert lines["bad"]["detail"].startswith("rejected:")


# ---------------------------------------------------------------- eval data

def pope_file(directory, image):
    directory.mkdir(exist_ok=True)
    path = directory / "coco_pope_random.json"
    path.write_text(json.dumps({"question_id": 1, "image": image, "text": "Is there a cat?",
                                "label": "yes"}) + "\n")
    return str(path)


def test_eval_image_paths_outside_the_root_are_an_error(tmp_path, capsys):
    secret = png(tmp_path / "secret.png", 30, 30)
    os.symlink(secret, tmp_path / "link.png")
    copy_to = str(tmp_path / "copy")
    for name, image in (("dotdot", "../secret.png"), ("absolute", secret),
                        ("symlink", "../link.png")):
        data = pope_file(tmp_path / name, image)
        argv = ["eval", "--task", "pope", "--data", data, "--copy-to", copy_to]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"{data}:1" in err and "outside" in err and "--allow-absolute-image-paths" in err
    assert not os.path.exists(copy_to)
    # allowed: the absolute path is read (the copy holds the secret image's bytes)
    data = pope_file(tmp_path / "absolute", secret)
    assert main(["eval", "--task", "pope", "--data", data, "--copy-to", copy_to,
                 "--allow-absolute-image-paths"]) == 0
    assert "1 samples copied" in capsys.readouterr().out


# ---------------------------------------------------------------- TFDS copies

def test_tfds_copy_naming_a_module_is_refused_without_importing_it(tmp_path, monkeypatch,
                                                                   capsys):
    image = png(tmp_path / "cat.png", 30, 20)
    data = pope_file(tmp_path / "pope", image)
    assert main(["eval", "--task", "pope", "--data", data, "--image-root", str(tmp_path),
                 "--copy-to", str(tmp_path / "copies")]) == 0
    copy = str(tmp_path / "copies" / "eval_samples" / "pope" / "1.0.0")
    capsys.readouterr()
    # A module that records being imported, importable from sys.path.
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "guard_probe_feature.py").write_text(
        "import os\nopen(os.environ['GUARD_PROBE_FILE'], 'w').write('imported')\n")
    flag = tmp_path / "imported.flag"
    monkeypatch.setenv("GUARD_PROBE_FILE", str(flag))
    monkeypatch.syspath_prepend(str(mod_dir))
    features = os.path.join(copy, "features.json")
    doc = json.load(open(features))
    doc["featuresDict"]["features"]["question"]["pythonClassName"] = "guard_probe_feature.Text"
    json.dump(doc, open(features, "w"))
    assert main(["eval", "--task", "pope", "--data", copy, "--copy-to",
                 str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert features in err and "guard_probe_feature.Text" in err
    assert "guard_probe_feature" not in sys.modules and not flag.exists()
    # the training reader refuses it too
    from mllm_jax.data.tfds_builders import records_from_tfds
    with pytest.raises(ValueError, match="guard_probe_feature.Text"):
        list(records_from_tfds(copy))
    assert "guard_probe_feature" not in sys.modules and not flag.exists()


def test_tfds_build_skips_images_outside_the_root_and_unencodable_text(tmp_path):
    from mllm_jax.data.tfds_builders import make_builder, skipped_report
    root = tmp_path / "root"
    root.mkdir()
    png(root / "a.png", 30, 20)
    secret = png(tmp_path / "secret.png", 30, 20)
    entries = [{"id": "ok", "image": "a.png", "conversations": ask()},
               {"id": "dotdot", "image": "../secret.png", "conversations": ask()},
               {"id": "absolute", "image": secret, "conversations": ask()},
               {"id": "surrogate", "conversations": ask("what is \ud800?")}]
    (root / "d.json").write_text(json.dumps(entries))
    builder = make_builder("instructions", root / "d.json", root, tmp_path / "tfds")
    builder.download_and_prepare()  # the surrogate used to stop the build in TFDS's encoder
    report = skipped_report(builder)
    assert report["by_reason"] == {P.OUTSIDE_ROOT: 2, P.TEXT_NOT_ENCODABLE: 1}
    assert sorted(r["id"] for r in report["records"]) == ["absolute", "dotdot", "surrogate"]
