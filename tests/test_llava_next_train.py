"""LLaVA-NeXT trains from LLaVA-format data: the pipeline gives each image its anyres views
and its `image_sizes`, expands each placeholder to that image's own token count, and lays a
batch out with static shapes ([B, max_images, max_views, h, w, 3]); the lm objective's loss
on such a batch equals transformers' on the same images in its own layout, and a stage-2
training step on it starts from that loss."""
import json
import os

import jax
import numpy as np
import pytest
import torch

import mllm_jax
from mllm_jax.data.sources import make_data
from mllm_jax.models import llava_next, registry
from mllm_jax.train import recipe, step as step_lib
from mllm_jax.train.loop import train
from test_llava_next_serving import SIZES, ckpt  # noqa: F401  (the module-scoped checkpoint)

TEMPLATE = "chatml"
# (image indices, question, answer): one image each way round, both, none.
SAMPLES = [([0], "what is it?", "a wide picture"), ([1], "and this one?", "a tall one"),
           ([1, 0], "compare them", "the first is tall"), ([], "hello", "hi there")]


@pytest.fixture(scope="module")
def data_file(ckpt):  # noqa: F811
    _, pictures, _, _ = ckpt
    root = os.path.dirname(pictures[0])
    records = []
    for k, (images, q, a) in enumerate(SAMPLES):
        record = {"id": f"s{k}", "conversations": [
            {"from": "human", "value": "<image>\n" * len(images) + q},
            {"from": "gpt", "value": a}]}
        if images:
            record["image"] = [os.path.basename(pictures[i]) for i in images]
        records.append(record)
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _config(ckpt, data_file):  # noqa: F811
    d = ckpt[0]
    c = recipe.base("tiny-llava")
    model, _ = mllm_jax.load_hf(d)
    c.model = model.cfg
    c.init.hf_checkpoint = d
    c.stage.update(name="stage2", trainable=[recipe.PROJECTOR, recipe.LLM, r"^image_newline$"])
    c.train.update(global_batch_size=4, num_steps=1, lr=1e-3, warmup_ratio=0.0, log_every=1,
                   checkpoint_every=10, async_checkpointing=False, export_final=False)
    c.data.update(source="llava_json", json=data_file, image_root=os.path.dirname(data_file),
                  tokenizer=d, processor=d, template=TEMPLATE, max_length=224, images=2,
                  workers=0)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c


@pytest.fixture(scope="module")
def batch(ckpt, data_file):  # noqa: F811
    data = make_data(_config(ckpt, data_file), 0, 1)
    out = next(data)
    return out, list(data.last_sample_ids)


def test_batches_hold_anyres_views_sizes_and_per_image_tokens(ckpt, data_file,  # noqa: F811
                                                              batch):
    model, _ = mllm_jax.load_hf(ckpt[0])
    b, ids = batch
    views = llava_next.max_views(model.cfg)
    assert b["pixel_values"].shape == (4, 2, views, 28, 28, 3)
    assert b["image_sizes"].shape == (4, 2, 2)
    for row, sample in enumerate(ids):
        images = SAMPLES[int(sample[1:])][0]
        sizes = [SIZES[i] for i in images]
        assert b["image_sizes"][row, :len(sizes)].tolist() == [list(s) for s in sizes]
        want = sum(registry.tokens_per_image(model.cfg, s) for s in sizes)
        assert int(np.sum(b["input_ids"][row] == model.cfg.image_token_index)) == want
        assert not b["pixel_values"][row, len(sizes):].any()
    # DPO pairs and packed rows do not carry such images: refused when built.
    for change in ({"stage.objective": "dpo"}, {"data.packing": True}):
        bad = _config(ckpt, data_file)
        for key, value in change.items():
            section, field = key.split(".")
            bad[section][field] = value
        with pytest.raises(ValueError, match="anyres"):
            make_data(bad, 0, 1)


def _hf_loss(ckpt, b, ids):  # noqa: F811
    """transformers' mean next-token loss on the batch's real images in HF's layout."""
    _, _, ref, _ = ckpt
    counts = [len(SAMPLES[int(s[1:])][0]) for s in ids]
    pixels = np.concatenate([b["pixel_values"][r, :n] for r, n in enumerate(counts)])
    sizes = np.concatenate([b["image_sizes"][r, :n] for r, n in enumerate(counts)])
    targets = np.concatenate([b["labels"][:, 1:], np.full((4, 1), -100)], axis=1)
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(b["input_ids"]).long(),
                     attention_mask=torch.tensor(b["attention_mask"]).long(),
                     pixel_values=torch.tensor(pixels).permute(0, 1, 4, 2, 3),
                     image_sizes=torch.tensor(sizes).long()).logits
        return float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).long().reshape(-1),
            ignore_index=-100))


def test_lm_loss_equals_transformers_and_a_training_step_starts_there(  # noqa: F811
        ckpt, data_file, batch, tmp_path):  # noqa: F811
    b, ids = batch
    model, params = mllm_jax.load_hf(ckpt[0])
    total, n, _ = step_lib.lm_objective(model, params, b, None)
    ours = float(total) / float(n)
    assert ours == pytest.approx(_hf_loss(ckpt, b, ids), rel=1e-5, abs=1e-6)
    summary = train(_config(ckpt, data_file), str(tmp_path / "run"), log=lambda *_: None,
                    devices=jax.devices()[:1])
    assert summary["step"] == 1
    assert summary["losses"][0] == pytest.approx(ours, rel=1e-5, abs=1e-6)
