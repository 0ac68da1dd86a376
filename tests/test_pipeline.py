"""The LLaVA JSON pipeline: exact resume, disjoint processes, determinism, fixed shapes, and
bad records counted by reason (never stopping the run, never silent)."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data import pipeline as P
from mllm_jax.data import templates as T
from mllm_jax.data.image import ImageProcessorConfig
from mllm_jax.data.llava_json import read_llava_json
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.train.losses import IGNORE_INDEX
from test_templates import WORDS, make_hf

TOKENS_PER_IMAGE = 4
MAX_LENGTH = 96
MAX_IMAGES = 2
CROP = 28
BAD_KINDS = (P.MISSING_IMAGE, P.UNREADABLE_IMAGE, P.MALFORMED_CONVERSATION,
             P.IMAGE_COUNT_MISMATCH, P.EMPTY_TEXT, T.PROMPT_TOO_LONG)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_hf(str(tmp_path_factory.mktemp("tok") / "bl"), "bytelevel"))


IMAGE_CFG = ImageProcessorConfig(mode="crop", size={"shortest_edge": CROP}, crop_size=CROP)


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _png(path, rng):
    w, h = rng.randint(20, 40), rng.randint(20, 40)
    arr = np.random.default_rng(rng.randint(0, 2 ** 31)).integers(0, 256, (h, w, 3), np.uint8)
    Image.fromarray(arr).save(path)


def make_dataset(root, n_good, bad_per_kind=0, seed=0):
    """A LLaVA JSON file with n_good good samples (0, 1 or 2 images, 1 or 2 turns) and
    bad_per_kind samples of each kind in BAD_KINDS, shuffled. -> (path, good ids, bad ids
    by reason)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries, good, bad = [], [], {k: [] for k in BAD_KINDS}

    def image(name):
        _png(root / name, rng)
        return name

    for k in range(n_good):
        sid = f"good-{k}"
        n_img = k % 3
        images = [image(f"{sid}-{j}.png") for j in range(n_img)]
        q = ("<image>\n" * n_img) + _sentence(rng, rng.randint(3, 8)) + "?"
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": _sentence(rng, 4)}]
        if k % 4 == 0:
            conv += [{"from": "human", "value": _sentence(rng, 3)},
                     {"from": "gpt", "value": _sentence(rng, 2)}]
        e = {"id": sid, "conversations": conv}
        if images:
            e["image"] = images[0] if n_img == 1 else images
        entries.append(e)
        good.append(sid)
    ok = lambda q="<image>\nwhat is it?": [{"from": "human", "value": q},  # noqa: E731
                                          {"from": "gpt", "value": "a red cube"}]
    for k in range(bad_per_kind):
        entries.append({"id": f"missing-{k}", "image": f"nope-{k}.png", "conversations": ok()})
        garbage = root / f"garbage-{k}.png"
        garbage.write_bytes(b"\x89PNG not really" + bytes(range(50)))
        entries.append({"id": f"garbage-{k}", "image": garbage.name, "conversations": ok()})
        entries.append({"id": f"roles-{k}", "conversations": [
            {"from": "gpt", "value": "hello"}, {"from": "human", "value": "what?"}]})
        entries.append({"id": f"count-{k}", "image": image(f"count-{k}.png"),
                        "conversations": ok("<image> <image> two of them?")})
        entries.append({"id": f"empty-{k}", "conversations": [
            {"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "  "}]})
        entries.append({"id": f"long-{k}", "conversations": ok(_sentence(rng, 300))})
        for reason, prefix in zip(BAD_KINDS, ["missing", "garbage", "roles", "count", "empty",
                                              "long"]):
            bad[reason].append(f"{prefix}-{k}")
    rng.shuffle(entries)
    path = root / "data.json"
    path.write_text(json.dumps(entries))
    return path, good, bad


def make_pipeline(records, tokenizer, **kw):
    args = dict(global_batch_size=4, max_length=MAX_LENGTH, max_images=MAX_IMAGES,
                image_tokens_per_image=TOKENS_PER_IMAGE, seed=0, return_sample_ids=True)
    args.update(kw)
    return P.LlavaPipeline(records, tokenizer, IMAGE_CFG, "chatml", **args)


def take(pipe, n):
    return [next(pipe) for _ in range(n)]


def ids_of(batches):
    return [s for b in batches for s in b["sample_ids"].tolist()]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path, good, _ = make_dataset(tmp_path_factory.mktemp("clean"), 40)
    return read_llava_json(path), good


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    path, good, bad = make_dataset(tmp_path_factory.mktemp("bad"), 70, bad_per_kind=5, seed=1)
    return read_llava_json(path), good, bad


def test_read_llava_json(tmp_path):
    path, good, _ = make_dataset(tmp_path, 6)
    records = read_llava_json(path)
    assert sorted(r.id for r in records) == sorted(good)
    r = next(r for r in records if r.id == "good-2")
    assert len(r.images) == 2 and all(p.startswith(str(tmp_path)) for p in r.images)
    assert r.images[0] == str(tmp_path / "good-2-0.png")  # root: the file's directory
    moved = {x.id: x for x in read_llava_json(path, image_root="/x")}
    assert moved["good-1"].images == ("/x/good-1-0.png",) and moved["good-0"].images == ()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in json.loads(path.read_text())) + "\n")
    assert [r.id for r in read_llava_json(jsonl)] == [r.id for r in records]


def test_fixed_shapes_and_contents(clean, tokenizer):
    records, _ = clean
    with make_pipeline(records, tokenizer, global_batch_size=8) as pipe:
        for batch in take(pipe, 6):
            assert batch["input_ids"].shape == (8, MAX_LENGTH)
            assert batch["input_ids"].dtype == np.int32
            assert batch["attention_mask"].shape == batch["labels"].shape == (8, MAX_LENGTH)
            assert batch["pixel_values"].shape == (8, MAX_IMAGES, CROP, CROP, 3)
            assert batch["pixel_values"].dtype == np.float32
            pad = batch["attention_mask"] == 0
            assert (batch["labels"][pad] == IGNORE_INDEX).all()
            assert (batch["input_ids"][pad] == tokenizer.pad_id).all()
            for row in range(8):
                n_img = int(batch["sample_ids"][row].split("-")[1]) % 3
                n_tok = (batch["input_ids"][row] == tokenizer.image_token_id).sum()
                assert n_tok == n_img * TOKENS_PER_IMAGE
                present = np.abs(batch["pixel_values"][row]).reshape(MAX_IMAGES, -1).max(1) > 0
                assert present.tolist() == [k < n_img for k in range(MAX_IMAGES)]
                assert (batch["labels"][row] != IGNORE_INDEX).any()


def test_deterministic_by_seed(clean, tokenizer):
    records, _ = clean
    a = take(make_pipeline(records, tokenizer, num_workers=2), 5)
    b = take(make_pipeline(records, tokenizer, num_workers=0), 5)
    c = take(make_pipeline(records, tokenizer, seed=1), 5)
    assert_same(a, b)
    assert ids_of(a) != ids_of(c)
    # Epoch order is the documented permutation.
    order = np.random.default_rng([0, 0]).permutation(len(records))
    assert ids_of(a) == [records[i].id for i in order[:20]]


@pytest.mark.parametrize("k", [3, 10, 11])  # mid-epoch, at and past the epoch boundary
def test_restore_is_exact(clean, tokenizer, k):
    records, _ = clean
    uninterrupted = take(make_pipeline(records, tokenizer), k + 6)
    first = make_pipeline(records, tokenizer, num_workers=3)
    take(first, k)
    state = json.loads(json.dumps(first.get_state()))
    take(first, 2)  # read on past the checkpoint: the restore must discard this
    first.set_state(state)
    assert_same(take(first, 6), uninterrupted[k:])
    fresh = make_pipeline(records, tokenizer, num_workers=0)
    fresh.set_state(state)
    assert_same(take(fresh, 6), uninterrupted[k:])


def test_restore_with_bad_records(corrupted, tokenizer, tmp_path):
    records, _, _ = corrupted
    uninterrupted = take(make_pipeline(records, tokenizer, global_batch_size=5), 30)
    first = make_pipeline(records, tokenizer, global_batch_size=5, workdir=tmp_path)
    take(first, 17)
    state = json.loads(json.dumps(first.get_state()))
    counts = first.report()
    take(first, 5)
    resumed = make_pipeline(records, tokenizer, global_batch_size=5, workdir=tmp_path)
    resumed.set_state(state)
    assert resumed.report() == counts
    assert_same(take(resumed, 13), uninterrupted[17:])
    lines = [json.loads(x) for x in (tmp_path / "data_report.jsonl").read_text().splitlines()]
    assert len(lines) == sum(resumed.report().values())  # no duplicates after the restore
    assert len({x["index"] for x in lines}) == len(lines)


def test_two_processes_are_disjoint(clean, tokenizer):
    records, good = clean
    seen = []
    for p in range(2):
        pipe = make_pipeline(records, tokenizer, global_batch_size=4, process_index=p,
                             process_count=2)
        batches = take(pipe, 10)  # 2 rows each: one epoch of this process's 20 records
        assert batches[0]["input_ids"].shape == (2, MAX_LENGTH)
        seen.append(ids_of(batches))
        assert pipe.get_state()["epoch"] == 1 and pipe.get_state()["position"] == 0
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(good)
    order = np.random.default_rng([0, 0]).permutation(len(records))
    assert seen[1] == [records[i].id for i in order[1::2]]


def test_bad_records_are_counted_by_reason(corrupted, tokenizer, tmp_path):
    records, good, bad = corrupted
    assert len(records) == 100
    pipe = make_pipeline(records, tokenizer, global_batch_size=5, workdir=tmp_path,
                         num_workers=2)
    per_epoch = len(good) // 5
    epoch0 = take(pipe, per_epoch)
    assert sorted(ids_of(epoch0)) == sorted(good)  # every good record once, none bad
    epoch1 = take(pipe, per_epoch)  # 70 good per epoch: batches align with epochs
    assert sorted(ids_of(epoch1)) == sorted(good)
    assert ids_of(epoch1) != ids_of(epoch0)
    expected = {reason: 5 for reason in BAD_KINDS}
    assert pipe.report() == expected  # each bad record counted once, not once per epoch
    lines = [json.loads(x) for x in (tmp_path / "data_report.jsonl").read_text().splitlines()]
    by_reason = {}
    for x in lines:
        by_reason.setdefault(x["reason"], []).append(x["sample_id"])
        assert x["detail"]
    assert {r: sorted(v) for r, v in by_reason.items()} == {r: sorted(v)
                                                           for r, v in bad.items()}
    summary = json.loads((tmp_path / "data_report.json").read_text())
    assert summary["counts"] == expected and summary["total"] == 30
    missing = next(x for x in lines if x["reason"] == P.MISSING_IMAGE)
    assert "nope-" in missing["detail"]


def test_all_bad_raises_instead_of_spinning(tmp_path, tokenizer):
    path, _, _ = make_dataset(tmp_path, 0, bad_per_kind=1)
    pipe = make_pipeline(read_llava_json(path), tokenizer, num_workers=0)
    with pytest.raises(RuntimeError, match="no usable record"):
        next(pipe)


def test_state_from_another_layout_is_refused(clean, tokenizer):
    records, _ = clean
    state = make_pipeline(records, tokenizer).get_state()
    with pytest.raises(ValueError, match="seed"):
        make_pipeline(records, tokenizer, seed=3).set_state(state)
    with pytest.raises(ValueError, match="process_count"):
        make_pipeline(records, tokenizer, process_count=2).set_state(state)
