"""The trainer fed by the LLaVA JSON pipeline: it trains, writes the data report, and a run
resumed from a checkpoint continues on exactly the batches an uninterrupted run sees."""
import json
import os
import signal

import numpy as np
import pytest

from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.train import recipe
from mllm_jax.train.loop import train
from test_pipeline import make_dataset
from test_templates import make_hf


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_data")
    tok_dir = make_hf(str(root / "tok"), "bytelevel")
    # 20 records, one bad record of each of 6 kinds: 5% corrupted records of each kind.
    path, good, bad = make_dataset(root / "images", n_good=14, bad_per_kind=1)
    return {"json": str(path), "tokenizer": tok_dir, "bad": bad}


def llava_json_config(json_path, tokenizer_dir, num_steps, **data):
    """A tiny-llava run on a LLaVA JSON file whose vocabulary fits the test tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    c = recipe.base("tiny-llava")
    c.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
    c.model.text.vocab_size = 1024
    assert tok.image_token_id < 1024
    c.model.image_token_index = tok.image_token_id
    c.train.update(lr=1e-3, warmup_ratio=0.0)
    c.train.update(global_batch_size=8, num_steps=num_steps, log_every=1, checkpoint_every=2,
                   async_checkpointing=False, export_final=False)
    c.data.update(source="llava_json", json=str(json_path), tokenizer=tokenizer_dir,
                  template="chatml", max_length=96, workers=2, **data)
    return c


def _cfg(data, num_steps):
    return llava_json_config(data["json"], data["tokenizer"], num_steps, images=2)


def test_llava_json_training_resumes_on_the_same_batches(data, tmp_path):
    full = train(_cfg(data, 4), str(tmp_path / "full"), log=lambda *_: None)
    assert all(np.isfinite(full["losses"])) and len(full["losses"]) == 4
    # Preempted (SIGTERM) after step 2 of the same 4-step run, then resumed.
    stop = lambda step, _: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None  # noqa
    first = train(_cfg(data, 4), str(tmp_path / "resumed"), log=lambda *_: None, on_step=stop)
    assert first["stopped_at"] == 2
    resumed = train(_cfg(data, 4), str(tmp_path / "resumed"), log=lambda *_: None)
    assert resumed["start_step"] == 2
    np.testing.assert_array_equal(first["losses"] + resumed["losses"], full["losses"])
    report = json.load(open(os.path.join(tmp_path / "full", "data_report.json")))
    # 32 samples consumed from a shuffled file of 20 records (more than an epoch): each bad
    # record is met, counted once by its reason and listed with its id.
    lines = [json.loads(l) for l in open(os.path.join(tmp_path / "full",
                                                      "data_report.jsonl"))]
    assert report["counts"] == {reason: 1 for reason in data["bad"]}
    assert report["total"] == len(lines) == 6
    for line in lines:
        assert line["sample_id"] in data["bad"][line["reason"]]
