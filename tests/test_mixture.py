"""Weighted mixtures of pipelines (proportions, determinism, exact resume, text-only and
multimodal rows in one batch), in-memory images, and preference pairs for DPO (labels on the
answers only; a tiny DPO run starts at loss log 2)."""
import io
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data import pipeline as P
from mllm_jax.data import templates as T
from mllm_jax.data.image import read_image, ImageReadError
from mllm_jax.data.llava_json import Record, read_llava_json, read_preference_json
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.train.losses import IGNORE_INDEX
from test_pipeline import (CROP, IMAGE_CFG, MAX_IMAGES, MAX_LENGTH, TOKENS_PER_IMAGE,
                           assert_same, make_dataset, take)
from test_templates import WORDS, make_hf


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_hf(str(tmp_path_factory.mktemp("tok") / "bl"), "bytelevel")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    path, _, _ = make_dataset(tmp_path_factory.mktemp("mm"), 30)
    return read_llava_json(path)


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def text_only():
    rng = random.Random(5)
    return [Record(f"text-{k}", (), [{"from": "human", "value": _sentence(rng, 5) + "?"},
                                     {"from": "gpt", "value": _sentence(rng, 3)}], k)
            for k in range(17)]


def _source(records, tokenizer, **kw):
    args = dict(max_length=MAX_LENGTH, max_images=MAX_IMAGES,
                image_tokens_per_image=TOKENS_PER_IMAGE, seed=0, num_workers=2)
    args.update(kw)
    return P.LlavaPipeline(records, tokenizer, IMAGE_CFG, "chatml", **args)


def _mixture(multimodal, text_only, tokenizer, weights=(0.7, 0.3), seed=0,
             global_batch_size=8, workers=2, process_index=0, process_count=1):
    kw = dict(num_workers=workers, process_index=process_index, process_count=process_count)
    return P.MixturePipeline(
        [(_source(multimodal, tokenizer, seed=1, **kw), weights[0]),
         (_source(text_only, tokenizer, seed=2, max_images=1, max_length=48, **kw),
          weights[1])],
        global_batch_size=global_batch_size, seed=seed, return_sample_ids=True)


def test_choices_follow_the_weights():
    weights = [0.5, 0.3, 0.15, 0.05]
    c = P.mixture_choices(7, np.arange(200_000), weights)
    np.testing.assert_allclose(np.bincount(c, minlength=4) / len(c), weights, atol=0.005)
    # A function of (seed, position) only.
    np.testing.assert_array_equal(P.mixture_choices(7, np.arange(1000, 1100), weights),
                                  c[1000:1100])
    assert (P.mixture_choices(8, np.arange(1000), weights) != c[:1000]).any()
    assert (P.mixture_choices(7, np.arange(1000), [1, 0, 0, 0]) == 0).all()


def test_mixture_proportions_shapes_and_rows(multimodal, text_only, tokenizer):
    with _mixture(multimodal, text_only, tokenizer) as mix:
        sources, mixed = [], 0
        for _ in range(60):  # 480 samples, several epochs of each source
            batch = next(mix)
            sources += mix.last_sources
            assert batch["input_ids"].shape == (8, MAX_LENGTH)
            assert batch["pixel_values"].shape == (8, MAX_IMAGES, CROP, CROP, 3)
            mixed += len(set(mix.last_sources)) == 2
            for row, (sid, src) in enumerate(zip(batch["sample_ids"], mix.last_sources)):
                assert sid.startswith("text-" if src == 1 else "good-")
                n_img = 0 if src == 1 else int(sid.split("-")[1]) % 3
                assert (batch["input_ids"][row] == tokenizer.image_token_id).sum() == \
                    n_img * TOKENS_PER_IMAGE
                present = np.abs(batch["pixel_values"][row]).reshape(MAX_IMAGES, -1).max(1) > 0
                assert present.tolist() == [k < n_img for k in range(MAX_IMAGES)]
                assert (batch["labels"][row] != IGNORE_INDEX).any()
        assert mixed > 30  # text-only and multimodal rows share batches
    share = np.mean(np.asarray(sources) == 0)
    assert abs(share - 0.7) < 0.06, share
    np.testing.assert_array_equal(sources, P.mixture_choices(0, np.arange(480), [0.7, 0.3]))


def test_mixture_is_deterministic(multimodal, text_only, tokenizer):
    a = take(_mixture(multimodal, text_only, tokenizer, workers=2), 6)
    b = take(_mixture(multimodal, text_only, tokenizer, workers=0), 6)
    assert_same(a, b)
    c = take(_mixture(multimodal, text_only, tokenizer, seed=1), 6)
    assert [x["sample_ids"].tolist() for x in a] != [x["sample_ids"].tolist() for x in c]
    # The sample sequence does not depend on how it is cut into batches.
    d = take(_mixture(multimodal, text_only, tokenizer, global_batch_size=4), 12)
    assert [s for x in a for s in x["sample_ids"]] == [s for x in d for s in x["sample_ids"]]


@pytest.mark.parametrize("k", [2, 9])
def test_mixture_restore_is_exact(multimodal, text_only, tokenizer, k):
    uninterrupted = take(_mixture(multimodal, text_only, tokenizer), k + 5)
    first = _mixture(multimodal, text_only, tokenizer, workers=3)
    take(first, k)
    state = json.loads(json.dumps(first.get_state()))
    take(first, 3)  # read on past the checkpoint
    first.set_state(state)
    assert_same(take(first, 5), uninterrupted[k:])
    fresh = _mixture(multimodal, text_only, tokenizer, workers=0)
    fresh.set_state(state)
    assert_same(take(fresh, 5), uninterrupted[k:])
    with pytest.raises(ValueError, match="weights"):
        _mixture(multimodal, text_only, tokenizer, weights=(0.5, 0.5)).set_state(state)


def test_mixture_processes_split_the_global_batch(multimodal, text_only, tokenizer):
    for p in range(2):
        mix = _mixture(multimodal, text_only, tokenizer, process_index=p, process_count=2)
        for step in range(4):
            batch = next(mix)
            assert batch["input_ids"].shape == (4, MAX_LENGTH)
            start = step * 8 + p * 4
            assert mix.last_sources == P.mixture_choices(
                0, np.arange(start, start + 4), [0.7, 0.3]).tolist()


# ---- in-memory images ---------------------------------------------------------------------

class _Mem:
    def __init__(self, path, data):
        self.path, self.data = path, data


def test_in_memory_images_decode_like_files(multimodal, tokenizer, tmp_path):
    with_images = [r for r in multimodal if r.images]
    in_memory = [Record(r.id, tuple(_Mem(f"mem/{k}.png", open(p, "rb").read())
                                    for k, p in enumerate(r.images)), r.conversations, r.index)
                 for r in with_images]
    a = take(_source(with_images, tokenizer, global_batch_size=4), 3)
    b = take(_source(in_memory, tokenizer, global_batch_size=4), 3)
    assert any(x["pixel_values"].any() for x in a)
    assert_same(a, b)
    # A corrupt in-memory image is reported by its path, not fatal.
    broken = [Record("broken", (_Mem("mem/broken.png", b"\x89PNG nope"),),
                     [{"from": "human", "value": "<image>\nwhat?"},
                      {"from": "gpt", "value": "a cube"}], 0)] + with_images[:3]
    pipe = _source(broken, tokenizer, global_batch_size=3, workdir=tmp_path)
    take(pipe, 2)
    assert pipe.report() == {P.UNREADABLE_IMAGE: 1}
    line = json.loads((tmp_path / "data_report.jsonl").read_text().splitlines()[0])
    assert "mem/broken.png" in line["detail"]
    with pytest.raises(ImageReadError, match="mem/broken.png"):
        read_image(_Mem("mem/broken.png", b"nope"))
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, "PNG")
    assert read_image(_Mem("x.png", buf.getvalue())).size == (3, 2)


# ---- preference pairs ---------------------------------------------------------------------

def make_preferences(root, n=12, seed=0):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(n):
        e = {"id": f"pair-{k}", "prompt": _sentence(rng, 4) + "?",
             "chosen": _sentence(rng, 3), "rejected": _sentence(rng, 2 + k % 3)}
        if k % 2 == 0:
            arr = np.random.default_rng(k).integers(0, 256, (24, 30, 3), np.uint8)
            Image.fromarray(arr).save(root / f"p{k}.png")
            e["image"] = f"p{k}.png"
            e["prompt"] = "<image>\n" + e["prompt"]
        entries.append(e)
    entries.append({"id": "bad-pair", "prompt": "?", "chosen": "a"})  # no rejected
    path = root / "prefs.json"
    path.write_text(json.dumps(entries))
    return path


def test_preference_batches(tokenizer, tmp_path):
    records = read_preference_json(make_preferences(tmp_path))
    by_id = {r.id: r for r in records}
    pipe = _source(records, tokenizer, global_batch_size=4, mode="dpo",
                   return_sample_ids=True, workdir=tmp_path)
    batches = take(pipe, 6)  # 24 rows, two epochs of 12 good pairs
    assert pipe.report() == {P.MALFORMED_CONVERSATION: 1}
    tpl = T.get_template("chatml")
    for batch in batches:
        assert "input_ids" not in batch
        for side in ("chosen", "rejected"):
            for key in ("input_ids", "attention_mask", "labels"):
                assert batch[f"{side}_{key}"].shape == (4, MAX_LENGTH)
        assert batch["pixel_values"].shape == (4, MAX_IMAGES, CROP, CROP, 3)
        for row, sid in enumerate(batch["sample_ids"]):
            r = by_id[sid]
            for side in ("chosen", "rejected"):
                conv = [{"from": "human", "value": r.prompt},
                        {"from": "gpt", "value": getattr(r, side)}]
                ex = T.build_example(conv, tpl, tokenizer,
                                     image_tokens_per_image=TOKENS_PER_IMAGE,
                                     max_length=MAX_LENGTH, sample_id=sid)
                n = len(ex["input_ids"])
                np.testing.assert_array_equal(batch[f"{side}_input_ids"][row, :n],
                                              ex["input_ids"])
                np.testing.assert_array_equal(batch[f"{side}_labels"][row, :n], ex["labels"])
                labels = batch[f"{side}_labels"][row]
                text = tokenizer.decode([int(t) for t in labels if t != IGNORE_INDEX])
                assert getattr(r, side) in text and r.prompt.split("\n")[-1] not in text
            n_img = len(r.images)
            present = np.abs(batch["pixel_values"][row]).reshape(MAX_IMAGES, -1).max(1) > 0
            assert present.tolist() == [k < n_img for k in range(MAX_IMAGES)]
            # The prompt (everything before the first label) is the same on both sides.
            first = [int(np.argmax(batch[f"{s}_labels"][row] != IGNORE_INDEX))
                     for s in ("chosen", "rejected")]
            assert first[0] == first[1]
            np.testing.assert_array_equal(batch["chosen_input_ids"][row, :first[0]],
                                          batch["rejected_input_ids"][row, :first[0]])


def _dpo_cfg(json_path, tokenizer_dir, num_steps, **data):
    from test_train_data import llava_json_config
    c = llava_json_config(json_path, tokenizer_dir, num_steps, images=1, **data)
    c.stage.objective = "dpo"
    return c


def test_tiny_dpo_run_starts_at_log2(tokenizer_dir, tmp_path):
    from mllm_jax.train.loop import train
    path = make_preferences(tmp_path / "data")
    out = train(_dpo_cfg(path, tokenizer_dir, 2), str(tmp_path / "run"), log=lambda *_: None)
    assert len(out["losses"]) == 2 and all(np.isfinite(out["losses"]))
    assert abs(out["losses"][0] - math.log(2)) < 1e-6, out["losses"]
    assert abs(out["losses"][1] - out["losses"][0]) > 1e-4  # the pairs carry a gradient
    report = json.load(open(tmp_path / "run" / "data_report.json"))
    assert report["counts"] == {P.MALFORMED_CONVERSATION: 1}


def test_make_data_mixture(tokenizer_dir, multimodal, tmp_path):
    from mllm_jax.train.loop import make_data
    from mllm_jax.train import recipe
    mm_path, _, _ = make_dataset(tmp_path / "mm", 9)
    text = tmp_path / "text.json"
    text.write_text(json.dumps([{"id": f"t{k}", "conversations": [
        {"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "a cube"}]}
        for k in range(5)]))
    tok = load_tokenizer(tokenizer_dir)
    c = recipe.base("tiny-llava")
    c.model.image_token_index = tok.image_token_id
    c.train.global_batch_size = 6
    c.data.update(source="llava_json", tokenizer=tokenizer_dir, template="chatml",
                  max_length=96, images=2, workers=0,
                  mixture=[{"json": str(mm_path), "weight": 3.0},
                           {"json": str(text), "weight": 1.0}])
    data = make_data(c, 0, 1, tmp_path / "work")
    batches = [next(data) for _ in range(4)]
    assert isinstance(data, P.MixturePipeline)
    assert batches[0]["input_ids"].shape == (6, 96)
    state = json.loads(json.dumps(data.get_state()))
    more = [next(data) for _ in range(2)]
    again = make_data(c, 0, 1, tmp_path / "work2")
    again.set_state(state)
    assert_same([next(again) for _ in range(2)], more)
    assert (tmp_path / "work").is_dir()


def test_make_data_tfds_preferences(tokenizer_dir, tmp_path):
    """data.source=tfds with the dpo objective: a built preferences dataset feeds the DPO
    batches directly (images read from memory)."""
    pytest.importorskip("tensorflow_datasets")
    from mllm_jax.data import tfds_builders as B
    from mllm_jax.train import recipe
    from mllm_jax.train.loop import make_data
    path = make_preferences(tmp_path / "data", n=6)
    builder = B.make_builder("preferences", path, tmp_path / "data", tmp_path / "tfds")
    builder.download_and_prepare()
    tok = load_tokenizer(tokenizer_dir)
    c = recipe.base("tiny-llava")
    c.stage.objective = "dpo"
    c.model.image_token_index = tok.image_token_id
    c.train.global_batch_size = 4
    c.data.update(source="tfds", tfds_dir=str(builder.data_dir), tokenizer=tokenizer_dir,
                  template="chatml", max_length=96, images=1, workers=0)
    data = make_data(c, 0, 1)
    batch = next(data)
    assert sorted(batch) == sorted(["chosen_input_ids", "chosen_attention_mask",
                                    "chosen_labels", "rejected_input_ids",
                                    "rejected_attention_mask", "rejected_labels",
                                    "pixel_values"])
    assert batch["pixel_values"].any()
    assert B.skipped_report(builder)["count"] == 1  # the malformed pair, at build time
    assert all(np.isfinite(next(data)["chosen_labels"]).all() for _ in range(2))
