"""A TFDS dataset built from a small LLaVA-format JSON + images round-trips every field:
captions, instructions (multi-turn, multi-image, text-only) and preference pairs, written as
array_record files and read back through the data source; records whose images are missing
are skipped and reported, not fatal."""
import io
import json

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from mllm_jax.data import tfds_builders as B  # noqa: E402

rng = np.random.default_rng(0)


def _save(path, mode, fmt):
    h, w = rng.integers(5, 12, 2)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path, fmt)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    (root / "sub").mkdir()
    _save(root / "rgb.png", "RGB", "PNG")
    _save(root / "alpha.png", "RGBA", "PNG")
    _save(root / "sub" / "photo.jpg", "RGB", "JPEG")
    _save(root / "gray.jpg", "L", "JPEG")
    return root


def _turns(*texts):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(texts)]


INSTRUCTIONS = [
    {"id": "multi", "image": ["rgb.png", "sub/photo.jpg"],
     "conversations": _turns("<image>\n<image>\nCompare.", "Left is noise.", "Sure?", "Yes.")},
    {"id": "text-only", "conversations": _turns("Say hi in Greek.", "Γειά σου ✓")},
    {"id": 42, "image": "alpha.png", "conversations": _turns("<image>\nWhat?", "Alpha.")},
    {"id": "gone", "image": ["rgb.png", "missing.png"], "conversations": _turns("<image>", "x")},
    {"id": "multi", "image": "gray.jpg",  # duplicate id: the index tells them apart
     "conversations": [{"from": "human", "value": "<image>\nGray?", "extra": 1},
                       {"from": "gpt", "value": ""}]},
    {"id": "bad-turns", "conversations": [{"from": "human"}]},
]
CAPTIONS = [
    {"id": "c0", "image": "sub/photo.jpg", "conversations": _turns("<image>\nCaption:", "A.")},
    {"id": "c1", "image": "alpha.png", "conversations": _turns("Describe.\n<image>", "B.")},
    {"id": "c-missing", "image": "nope.jpg", "conversations": _turns("<image>", "C.")},
    {"id": "c-text", "conversations": _turns("no image", "D.")},
]
PREFERENCES = [
    {"id": "p0", "image": "rgb.png", "prompt": "<image>\nWhat is it?", "chosen": "Noise.",
     "rejected": "A cat."},
    {"id": "p1", "image": ["gray.jpg", "alpha.png"], "prompt": "<image><image> Same?",
     "chosen": "No.", "rejected": "Yes."},
    {"id": "p-text", "prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"id": "p-missing", "image": "nope.png", "prompt": "?", "chosen": "a", "rejected": "b"},
    {"id": "p-bad", "prompt": "?", "chosen": "a"},
]
KEPT = {"instructions": [0, 1, 2, 4], "captions": [0, 1], "preferences": [0, 1, 2]}
SKIPPED = {"instructions": {3: B.MISSING_IMAGE, 5: B.MALFORMED},
           "captions": {2: B.MISSING_IMAGE, 3: B.NO_IMAGE},
           "preferences": {3: B.MISSING_IMAGE, 4: B.MALFORMED}}
SOURCES = {"instructions": INSTRUCTIONS, "captions": CAPTIONS, "preferences": PREFERENCES}


@pytest.fixture(scope="module")
def built(root, tmp_path_factory):
    """kind -> prepared builder (each built once for the module)."""
    out = tmp_path_factory.mktemp("tfds")
    builders = {}
    for kind, entries in SOURCES.items():
        path = root / f"{kind}.jsonl" if kind == "captions" else root / f"{kind}.json"
        with open(path, "w", encoding="utf-8") as f:
            if kind == "captions":
                f.writelines(json.dumps(e) + "\n" for e in entries)
            else:
                json.dump(entries, f)
        builder = B.make_builder(kind, path, root, out)
        builder.download_and_prepare()
        builders[kind] = builder
    return builders


def _images_of(entry):
    image = entry.get("image")
    return [] if image is None else [image] if isinstance(image, str) else image


def _pixels(data_or_path):
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        return im.mode, np.asarray(im)


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


@pytest.mark.parametrize("kind", list(SOURCES))
def test_data_source_round_trips_every_field(built, root, kind):
    builder = built[kind]
    assert builder.info.file_format.value == "array_record"
    assert list(builder.data_path.glob("*.array_record-*"))
    data = builder.as_data_source(split="train")
    assert len(data) == len(KEPT[kind])
    for position, index in enumerate(KEPT[kind]):  # file order kept
        entry, example = SOURCES[kind][index], data[position]
        assert int(example["index"]) == index
        assert _text(example["id"]) == str(entry["id"])
        paths = _images_of(entry)
        assert [_text(p) for p in example["images"]["path"]] == paths
        stored = list(example["images"]["bytes"])
        assert len(stored) == len(paths)
        for p, data_bytes in zip(paths, stored):
            assert bytes(data_bytes) == (root / p).read_bytes()  # stored as is
            mode, pixels = _pixels(bytes(data_bytes))
            ref_mode, ref = _pixels(root / p)
            assert mode == ref_mode and np.array_equal(pixels, ref)
        if kind == "preferences":
            for k in ("prompt", "chosen", "rejected"):
                assert _text(example[k]) == entry[k]
        else:
            turns = example["conversations"]
            assert [_text(t) for t in turns["from"]] == [t["from"] for t in entry["conversations"]]
            assert [_text(t) for t in turns["value"]] == [t["value"]
                                                         for t in entry["conversations"]]


@pytest.mark.parametrize("kind", list(SOURCES))
def test_records_from_tfds(built, root, kind):
    for source in (built[kind], built[kind].data_dir):  # a builder or a prepared directory
        records = list(B.records_from_tfds(source))
        assert [r.index for r in records] == KEPT[kind]
        for r in records:
            entry = SOURCES[kind][r.index]
            assert r.id == str(entry["id"])
            assert [i.path for i in r.images] == _images_of(entry)
            assert [i.data for i in r.images] == [(root / p).read_bytes()
                                                  for p in _images_of(entry)]
            if kind == "preferences":
                assert isinstance(r, B.PreferenceRecord)
                assert (r.prompt, r.chosen, r.rejected) == (entry["prompt"], entry["chosen"],
                                                            entry["rejected"])
            else:
                assert r.conversations == [{"from": t["from"], "value": t["value"]}
                                           for t in entry["conversations"]]


@pytest.mark.parametrize("kind", list(SOURCES))
def test_skipped_records_are_reported(built, kind):
    report = B.skipped_report(built[kind])
    assert report["count"] == len(SKIPPED[kind])
    got = {r["index"]: r["reason"] for r in report["records"]}
    assert got == SKIPPED[kind]
    assert [r["id"] for r in report["records"]] == [str(SOURCES[kind][i]["id"])
                                                    for i in SKIPPED[kind]]
    # saved with the data, so a reader of the directory sees it too
    reread = tfds.builder_from_directory(built[kind].data_dir)
    assert reread.info.metadata["skipped"]["count"] == len(SKIPPED[kind])


def test_pipeline_records_match_the_json(built, root):
    """records_from_tfds gives LlavaPipeline the same records (images byte-identical, in
    memory) that reading the JSON gives, minus the skipped ones."""
    from mllm_jax.data.llava_json import read_llava_json
    from_json = read_llava_json(root / "instructions.json", root)
    records = list(B.records_from_tfds(built["instructions"]))
    assert [r.index for r in records] == KEPT["instructions"]
    for r in records:
        ref = from_json[r.index]
        assert r.id == str(ref.id) and r.index == ref.index
        assert [i.data for i in r.images] == [open(p, "rb").read() for p in ref.images]
        assert r.conversations == [{"from": t["from"], "value": t["value"]}
                                   for t in ref.conversations]


def test_pipeline_batches_equal_from_json_and_tfds(built, root, tmp_path):
    """The pipeline yields identical batches from the built dataset (its records fed as they
    are, images decoded from memory) and from the JSON."""
    from mllm_jax.data import pipeline as P
    from mllm_jax.data.image import ImageProcessorConfig
    from mllm_jax.data.llava_json import read_llava_json
    from mllm_jax.data.tokenizer import load_tokenizer
    from test_templates import make_hf

    tokenizer = load_tokenizer(make_hf(str(tmp_path / "tok"), "bytelevel"))
    kept = [read_llava_json(root / "instructions.json", root)[i] for i in KEPT["instructions"]]
    records = list(B.records_from_tfds(built["instructions"]))  # images in memory

    def batches(recs):
        cfg = ImageProcessorConfig(mode="crop", size={"shortest_edge": 8}, crop_size=8)
        with P.LlavaPipeline(recs, tokenizer, cfg, "chatml", global_batch_size=2,
                             max_length=64, max_images=2, image_tokens_per_image=2,
                             seed=0) as pipe:
            return [next(pipe) for _ in range(3)]

    got, want = batches(records), batches(kept)
    assert any(np.asarray(x["pixel_values"]).any() for x in want)  # images really decoded
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_pipeline_reads_preferences_from_tfds(built, root, tmp_path):
    """Preference records (in-memory images) feed the DPO mode as they are, with the same
    batches as the JSON preference file gives."""
    from mllm_jax.data import pipeline as P
    from mllm_jax.data.image import ImageProcessorConfig
    from mllm_jax.data.llava_json import read_preference_json
    from mllm_jax.data.tokenizer import load_tokenizer
    from test_templates import make_hf

    tokenizer = load_tokenizer(make_hf(str(tmp_path / "tok"), "bytelevel"))
    kept = [read_preference_json(root / "preferences.json", root)[i]
            for i in KEPT["preferences"]]

    def batches(recs):
        cfg = ImageProcessorConfig(mode="crop", size={"shortest_edge": 8}, crop_size=8)
        with P.LlavaPipeline(recs, tokenizer, cfg, "chatml", global_batch_size=3,
                             max_length=64, max_images=2, image_tokens_per_image=2, seed=0,
                             mode="dpo", return_sample_ids=True) as pipe:
            return [next(pipe) for _ in range(2)]

    got, want = batches(list(B.records_from_tfds(built["preferences"]))), batches(kept)
    assert any(np.asarray(x["pixel_values"]).any() for x in got)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
