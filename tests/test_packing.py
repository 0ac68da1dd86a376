"""Sample packing (data.packing): a packed row gives each sample the hidden states, summed NLL
and loss gradients it has alone in an unpacked row; images never cross samples; the
pipeline's packed rows (segments, positions, labels, images, whole samples) resume exactly;
DPO pairs packed per segment give the unpacked per-pair log-probs and loss."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import build_model, presets
from mllm_jax.data import packing
from mllm_jax.data.collate import collate
from mllm_jax.data.llava_json import read_llava_json, read_preference_json
from mllm_jax.models import registry
from mllm_jax.train import losses, step
from mllm_jax.train.losses import IGNORE_INDEX
from test_mixture import make_preferences
from test_pipeline import (CROP, MAX_LENGTH, TOKENS_PER_IMAGE, make_dataset,
                           make_pipeline, take)
from test_templates import make_hf

ROW = 64  # tokens per row in the model tests
CFG = presets.get("tiny-llava")
IMAGE_TOKENS = registry.tokens_per_image(CFG)
IMAGE_SHAPE = (CFG.vision.image_size, CFG.vision.image_size, CFG.vision.num_channels)


# ---- model: packed rows against one sample per row -----------------------------------------

def make_example(rng, sid, n_images, n_prompt, n_answer, *, bos=True):
    """(BOS,) the images' tokens, a prompt, an answer (the only labels; without BOS and
    prompt, every token is a label, the first one included)."""
    text = rng.integers(3, CFG.image_token_index, n_prompt + n_answer)
    ids = np.concatenate([[1] if bos else [],
                          np.full(IMAGE_TOKENS * n_images, CFG.image_token_index), text])
    labels = np.full(len(ids), IGNORE_INDEX)
    labels[-n_answer:] = ids[-n_answer:]
    pixels = [rng.standard_normal(IMAGE_SHAPE).astype(np.float32) for _ in range(n_images)]
    return {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
            "pixels": pixels, "sample_id": sid}


def device_batch(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "sample_ids"}


@pytest.fixture(scope="module")
def model_and_params():
    model = build_model(CFG)
    init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))))
    return model, init(jax.random.PRNGKey(0))["params"]


@pytest.fixture(scope="module")
def lm_fn(model_and_params):
    """(hidden states, per-token log-probs, gradients of the lm loss) of a batch."""
    model, _ = model_and_params

    @jax.jit
    def run(params, batch):
        h = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                        batch["attention_mask"], segment_ids=batch.get("segment_ids"),
                        position_ids=batch.get("position_ids"), method="hidden_states")
        head = model.apply({"params": params}, method="output_head")
        lp = losses.token_logprobs(h, losses.shift_labels(batch["labels"]), head)

        def loss(p):
            total, n, _ = step.lm_objective(model, p, batch, None)
            return total / n
        return h, lp, jax.grad(loss)(params)
    return run


@pytest.fixture(scope="module")
def lm_batches():
    """Five samples: packed three and two to a row (3 images per row), and one per row."""
    rng = np.random.default_rng(0)
    a = make_example(rng, "a", 1, 4, 5)
    # Text-only, between two samples with images, a label on its first token.
    b = make_example(rng, "b", 0, 0, 9, bos=False)
    c = make_example(rng, "c", 1, 3, 4)
    d = make_example(rng, "d", 2, 2, 4)
    e = make_example(rng, "e", 1, 2, 3)
    rows = [[a, b, c], [d, e]]
    packed = packing.collate_packed(rows, "lm", max_length=ROW, max_images=3,
                                    image_shape=IMAGE_SHAPE, pad_id=0)
    alone = collate([a, b, c, d, e], "lm", batch_size=5, max_length=ROW, max_images=2,
                    image_shape=IMAGE_SHAPE, pad_id=0)
    return rows, packed, alone


def _spans(rows):
    """(row, start, length) of every sample, in order."""
    out = []
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            out.append((r, start, len(ex["input_ids"])))
            start += len(ex["input_ids"])
    return out


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_packed_rows_give_each_sample_its_own_loss_and_gradients(model_and_params, lm_fn,
                                                                  lm_batches):
    _, params = model_and_params
    rows, packed, alone = lm_batches
    assert packed["input_ids"].shape == (2, ROW) and packed["pixel_values"].shape[:2] == (2, 3)
    h_p, lp_p, g_p = lm_fn(params, device_batch(packed))
    h_a, lp_a, g_a = lm_fn(params, device_batch(alone))
    per_sample = losses.segment_sums(lp_p, jnp.asarray(packed["segment_ids"]))
    spans = _spans(rows)
    for k, (r, start, n) in enumerate(spans):
        np.testing.assert_allclose(h_p[r, start:start + n], h_a[k, :n], atol=1e-5, rtol=1e-5)
        segment = int(packed["segment_ids"][r, start]) - 1
        nll_alone = -float(jnp.sum(lp_a[k]))
        assert nll_alone > 0
        assert abs(-float(per_sample[r, segment]) - nll_alone) < 1e-5 * max(1, nll_alone)
    assert float(jnp.sum(jnp.abs(per_sample[:, 3:]))) == 0.0  # no segment beyond the samples
    assert _max_diff(g_p, g_a) < 1e-5, _max_diff(g_p, g_a)
    assert _max_diff(g_p, jax.tree_util.tree_map(jnp.zeros_like, g_p)) > 1e-3


def test_images_never_cross_samples(model_and_params, lm_fn, lm_batches):
    _, params = model_and_params
    rows, packed, _ = lm_batches
    spans = _spans(rows)
    base = lm_fn(params, device_batch(packed))[0]

    def changed_samples(row, image):
        pix = packed["pixel_values"].copy()
        pix[row, image] += 1.0
        h = lm_fn(params, device_batch({**packed, "pixel_values": pix}))[0]
        return [k for k, (r, s, n) in enumerate(spans)
                if float(jnp.max(jnp.abs(h[r, s:s + n] - base[r, s:s + n]))) > 1e-6]

    # Row 0 holds a (image 0), b (text only), c (image 1); row 1 d (images 0, 1), e (image 2).
    assert changed_samples(0, 0) == [0]
    assert changed_samples(0, 1) == [2]
    assert changed_samples(1, 1) == [3]
    assert changed_samples(1, 2) == [4]
    assert changed_samples(0, 2) == []  # an empty image slot reaches no token


# ---- DPO: pairs packed one per segment -----------------------------------------------------

def make_pair(rng, sid, n_images, n_prompt, n_chosen, n_rejected):
    chosen = make_example(rng, sid, n_images, n_prompt, n_chosen)
    rejected = dict(chosen)
    prompt = chosen["input_ids"][:-n_chosen]
    answer = rng.integers(3, CFG.image_token_index, n_rejected).astype(np.int32)
    rejected["input_ids"] = np.concatenate([prompt, answer])
    rejected["labels"] = np.concatenate([np.full(len(prompt), IGNORE_INDEX, np.int32),
                                         answer])
    return {"chosen": chosen, "rejected": rejected, "pixels": chosen["pixels"],
            "sample_id": sid}


def test_dpo_packed_pairs_give_the_unpacked_log_probs_and_loss(model_and_params):
    model, params = model_and_params
    ref = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    rng = np.random.default_rng(1)
    pairs = [make_pair(rng, "p", 1, 4, 6, 3), make_pair(rng, "q", 0, 5, 2, 7),
             make_pair(rng, "r", 1, 3, 5, 5)]
    rows = [[pairs[0], pairs[1]], [pairs[2]]]
    packed = packing.collate_packed(rows, "dpo", max_length=ROW, max_images=2,
                                    image_shape=IMAGE_SHAPE, pad_id=0)
    np.testing.assert_array_equal(packed["chosen_segment_ids"].max(1),
                                  packed["rejected_segment_ids"].max(1))
    alone = collate(pairs, "dpo", batch_size=3, max_length=ROW, max_images=1,
                    image_shape=IMAGE_SHAPE, pad_id=0)

    @jax.jit
    def run(params, batch):
        def objective(p):
            total, n, metrics = step.dpo_objective(model, p, batch, {"ref": ref})
            return total, (n, metrics)
        (total, (n, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        head = model.apply({"params": params}, method="output_head")
        logps = []
        for side in ("chosen", "rejected"):
            seg = batch.get(f"{side}_segment_ids")
            h = model.apply({"params": params}, batch[f"{side}_input_ids"],
                            batch["pixel_values"], batch[f"{side}_attention_mask"],
                            segment_ids=seg, position_ids=batch.get(f"{side}_position_ids"),
                            method="hidden_states")
            logps.append(losses.sequence_logprob(h, batch[f"{side}_labels"], head,
                                                 segment_ids=seg))
        return total, n, metrics, grads, logps

    total_p, n_p, m_p, g_p, lp_p = run(params, device_batch(packed))
    total_a, n_a, m_a, g_a, lp_a = run(params, device_batch(alone))
    assert int(n_p) == int(n_a) == 3
    where = [(0, 0), (0, 1), (1, 0)]  # (row, segment - 1) of each pair
    for side in range(2):
        got = np.array([lp_p[side][r, k] for r, k in where])
        np.testing.assert_allclose(got, np.asarray(lp_a[side]), rtol=1e-5, atol=1e-5)
    assert float(jnp.sum(jnp.abs(lp_p[0][0, 2:]))) == 0.0
    np.testing.assert_allclose(float(total_p), float(total_a), rtol=1e-5)
    np.testing.assert_allclose(float(m_p["reward_margin"]), float(m_a["reward_margin"]),
                               rtol=1e-4, atol=1e-6)
    assert int(m_p["reward_accuracy"]) == int(m_a["reward_accuracy"])
    assert _max_diff(g_p, g_a) < 1e-5, _max_diff(g_p, g_a)


# ---- placement -----------------------------------------------------------------------------

def _sized(sid, n, images=0):
    return {"input_ids": np.zeros(n, np.int32), "labels": np.zeros(n, np.int32),
            "pixels": [0] * images, "sample_id": sid}


def test_first_fit_carries_what_fits_nowhere_into_the_next_batch():
    sizes = [("a", 6, 0), ("b", 7, 0), ("c", 3, 0), ("d", 4, 1), ("e", 2, 1), ("f", 9, 0),
             ("g", 1, 0), ("h", 8, 1), ("i", 3, 0), ("j", 5, 0)]
    stream = iter([_sized(*x) for x in sizes])

    def batch(carry):
        rows, carry = packing.pack(carry, lambda: next(stream), rows=2, mode="lm",
                                   max_length=10, max_images=1)
        return [[x["sample_id"] for x in row] for row in rows], carry

    # d fits no row (tokens); e joins b (a's row has no room); f fits nowhere: two examples
    # wait, as many as rows, so reading stops.
    rows, carry = batch([])
    assert rows == [["a", "c"], ["b", "e"]] and [x["sample_id"] for x in carry] == ["d", "f"]
    rows, carry = batch(carry)  # the carried examples go first
    assert rows == [["d", "g", "i"], ["f"]] and [x["sample_id"] for x in carry] == ["h", "j"]


def test_row_image_capacity():
    assert packing.row_image_capacity(2048, 1, 576) == 3
    assert packing.row_image_capacity(2048, 1, 576, requested=2) == 2
    assert packing.row_image_capacity(100, 0, 16) == 0
    with pytest.raises(ValueError, match="packing_images"):
        packing.row_image_capacity(2048, 2, 576, requested=1)


# ---- the pipeline's packed rows --------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mllm_jax.data.tokenizer import load_tokenizer
    return load_tokenizer(make_hf(str(tmp_path_factory.mktemp("tok") / "bl"), "bytelevel"))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path, _, _ = make_dataset(tmp_path_factory.mktemp("clean"), 40)
    return read_llava_json(path)


def _reference(records, tokenizer, mode="lm"):
    """sample id -> its unpacked example (per side), images, from one unpacked epoch."""
    pipe = make_pipeline(records, tokenizer, global_batch_size=4, mode=mode, num_workers=0)
    ref = {}
    for batch in take(pipe, len(records) // 4):
        for r, sid in enumerate(batch["sample_ids"]):
            sides = {}
            for prefix in packing.SIDES[mode]:
                n = int(batch[prefix + "attention_mask"][r].sum())
                sides[prefix] = (batch[prefix + "input_ids"][r, :n],
                                 batch[prefix + "labels"][r, :n])
            n_img = int((sides[packing.SIDES[mode][0]][0] == tokenizer.image_token_id).sum()
                        // TOKENS_PER_IMAGE)
            ref[str(sid)] = (sides, batch["pixel_values"][r, :n_img])
    return ref


def check_packed_batch(batch, ref, mode="lm"):
    """Every row: whole samples, each equal to its unpacked self, in its own segment with
    positions from 0, its first label ignored, its images in order; padding after."""
    for r, ids in enumerate(batch["sample_ids"]):
        ids = [str(s) for s in ids if s]
        images = [img for s in ids for img in ref[s][1]]
        pix = batch["pixel_values"][r]
        for k, img in enumerate(images):
            np.testing.assert_array_equal(pix[k], img)
        assert not pix[len(images):].any()
        for prefix in packing.SIDES[mode]:
            seg, pos = batch[prefix + "segment_ids"][r], batch[prefix + "position_ids"][r]
            lab, mask = batch[prefix + "labels"][r], batch[prefix + "attention_mask"][r]
            start = 0
            for k, sid in enumerate(ids):
                want_ids, want_labels = ref[sid][0][prefix]
                end = start + len(want_ids)
                assert (seg[start:end] == k + 1).all() and (mask[start:end] == 1).all()
                np.testing.assert_array_equal(pos[start:end], np.arange(end - start))
                np.testing.assert_array_equal(batch[prefix + "input_ids"][r, start:end],
                                              want_ids)
                assert lab[start] == IGNORE_INDEX
                np.testing.assert_array_equal(lab[start + 1:end], want_labels[1:])
                start = end
            assert not seg[start:].any() and not mask[start:].any()
            assert (lab[start:] == IGNORE_INDEX).all()
            targets = np.append(lab[1:], IGNORE_INDEX)  # losses.shift_labels
            boundary = np.flatnonzero(seg[:-1] != seg[1:])
            assert (targets[boundary] == IGNORE_INDEX).all()


def test_pipeline_packs_whole_samples(records, tokenizer):
    ref = _reference(records, tokenizer)
    pipe = make_pipeline(records, tokenizer, global_batch_size=4, packing=True,
                         packing_images=4)
    assert pipe.row_images == 4
    epoch0, seen, per_row = [], [], []
    for _ in range(len(records) // 4):  # enough batches to place every sample
        batch = next(pipe)
        assert batch["input_ids"].shape == (4, MAX_LENGTH)
        assert batch["pixel_values"].shape == (4, 4, CROP, CROP, 3)
        check_packed_batch(batch, ref)
        ids = [str(s) for s in batch["sample_ids"].ravel() if s]
        assert ids == pipe.last_sample_ids
        if pipe.get_state()["epoch"] == 0:  # this batch read epoch 0's records only
            epoch0 += ids
        seen += ids
        per_row.append(len(ids) / 4)
    assert len(set(epoch0)) == len(epoch0)  # no sample twice within an epoch
    assert set(seen) == set(ref)  # every sample placed, none lost in the carry
    assert np.mean(per_row) > 1.5  # samples of ~30-70 tokens in rows of 96


@pytest.mark.parametrize("k", [2, 5])
def test_packed_pipeline_resumes_on_the_same_rows(records, tokenizer, k):
    def pipe(**kw):
        return make_pipeline(records, tokenizer, global_batch_size=4, packing=True, **kw)
    uninterrupted = take(pipe(), k + 4)
    first = pipe(num_workers=3)
    take(first, k)
    state = json.loads(json.dumps(first.get_state()))
    assert state["packing"] and state["carry"]  # examples wait for the next batch
    take(first, 2)
    for resumed in (first, pipe(num_workers=0)):
        resumed.set_state(state)
        for a, b in zip(take(resumed, 4), uninterrupted[k:]):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(ValueError, match="packing"):
        make_pipeline(records, tokenizer).set_state(state)


def test_packing_processes_are_disjoint(records, tokenizer):
    seen = []
    for p in range(2):
        pipe = make_pipeline(records, tokenizer, global_batch_size=4, packing=True,
                             process_index=p, process_count=2)
        ids = []
        for _ in range(5):
            assert next(pipe)["input_ids"].shape == (2, MAX_LENGTH)
            if pipe.get_state()["epoch"] == 0:  # read within epoch 0
                ids += pipe.last_sample_ids
        assert len(ids) > 10
        seen.append(set(ids))
    assert not seen[0] & seen[1]


def test_pipeline_packs_preference_pairs(tokenizer, tmp_path):
    prefs = read_preference_json(make_preferences(tmp_path))
    ref = _reference(prefs, tokenizer, mode="dpo")
    pipe = make_pipeline(prefs, tokenizer, global_batch_size=2, mode="dpo", packing=True)
    for batch in take(pipe, 3):
        assert "input_ids" not in batch and "chosen_segment_ids" in batch
        check_packed_batch(batch, ref, mode="dpo")
        np.testing.assert_array_equal(batch["chosen_segment_ids"].max(1),
                                      batch["rejected_segment_ids"].max(1))
        assert batch["chosen_segment_ids"].max() >= 2


def test_packing_refuses_what_it_cannot_pack(records, tokenizer):
    with pytest.raises(ValueError, match="image_text"):
        make_pipeline(records, tokenizer, mode="image_text", packing=True)
    from mllm_jax.train import recipe, validate
    c = recipe.base("tiny-llava")
    c.data.packing = True
    assert any("data.source" in p for p in validate.problems(c))  # synthetic batches
    c.data.source = "llava_json"
    assert not [p for p in validate.problems(c) if "packing" in p]
    assert any("data.packing = 1" in p for p in validate.problems({"data": {"packing": 1}}))
    c.data.mixture = [{"json": "a.json"}]
    assert any("mixture" in p for p in validate.problems(c))


# ---- training on packed batches ------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_hf(str(tmp_path_factory.mktemp("tok_dir") / "bl"), "bytelevel")


@pytest.mark.parametrize("objective", ["lm", "dpo"])
def test_training_on_packed_batches(tokenizer_dir, tmp_path, objective):
    """data.packing through make_data and the sharded training step (8 devices)."""
    from mllm_jax.train.loop import train
    from test_train_data import llava_json_config
    if objective == "dpo":
        path, images = make_preferences(tmp_path / "data"), 1
    else:
        path, images = make_dataset(tmp_path / "data", 24)[0], 2
    c = llava_json_config(path, tokenizer_dir, 2, images=images, packing=True)
    c.stage.objective = objective
    out = train(c, str(tmp_path / "run"), log=lambda *_: None)
    assert len(out["losses"]) == 2 and all(np.isfinite(out["losses"]))
    saved = tmp_path / "run" / "checkpoints" / "2" / "data" / "metadata"  # the data state
    state = json.loads(saved.read_text())
    assert state["packing"] is True and "carry" in state


def test_bench_data_reports_padding_with_and_without_packing():
    from mllm_jax.bench import data as bench_data
    out = bench_data.run(samples=12, batch=4, step_time=2.0)
    packed = out["packed"]
    assert out["samples_per_row"] == 1.0 and packed["samples_per_row"] > 1
    assert 0 < packed["padding_fraction"] < out["padding_fraction"] < 1
    assert out["packing_tokens_per_row_gain"] == pytest.approx(
        packed["tokens_per_row"] / out["tokens_per_row"], rel=1e-3)
    assert packed["train_samples_per_s"] == pytest.approx(2.0 * packed["samples_per_row"],
                                                          rel=1e-2)
    assert set(out["mean_tokens_by_kind"]) <= set(bench_data.MIX)


def test_bench_train_packing_counts_real_tokens(capsys):
    from mllm_jax.cli import main
    assert main(["bench", "train", "--packing", "--preset", "tiny-llava", "--batch", "2",
                 "--text-len", "496", "--steps", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain, packed = out["unpacked"], out["packed"]
    assert out["seq_len"] == IMAGE_TOKENS + 496
    assert plain["samples_per_step"] == 2 and packed["samples_per_step"] > 2
    assert packed["real_tokens_per_step"] > plain["real_tokens_per_step"]
    assert packed["padding_fraction"] < plain["padding_fraction"]
    for run in (plain, packed):
        assert run["real_tokens_per_s"] == pytest.approx(
            run["real_tokens_per_step"] / run["step_time_s"], rel=1e-2)
    assert out["real_tokens_per_s_gain"] == pytest.approx(
        packed["real_tokens_per_s"] / plain["real_tokens_per_s"], rel=1e-2)
