"""Qwen2-VL's images through generation and the training data (`ModelFamily.image_inputs`,
`qwen2_vl.Qwen2VLImages`): prompts expand each image to its own merged-token count, two
images of different sizes batched give the one-at-a-time answers, and the LLaVA-format
pipeline lays a batch out row by row with a loss equal to the same batch in HF's layout."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import mllm_jax
from mllm_jax.data import qwen2_vl_image as qimg
from mllm_jax.data.sources import make_data
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer import batching
from mllm_jax.models import registry
from mllm_jax.models.qwen2_vl import qwen2_vl_config, qwen2_vl_text_config, qwen2_vl_vision_config
from mllm_jax.train import recipe
from mllm_jax.train import step as step_lib
from test_templates import make_hf

TEMPLATE = "chatml"
SIZES = [(60, 90), (100, 41)]  # (height, width): one wide, one tall
QUESTIONS = ["what is it?", "Is there a dog in the picture?"]
SAMPLES = [([0], "what is it?", "a wide picture"), ([1], "and this one?", "a tall one"),
           ([1, 0], "compare them", "the first is tall"), ([], "hello", "hi there")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint dir with a tokenizer, picture paths, model, params)."""
    root = tmp_path_factory.mktemp("qwen2_vl_serving")
    tok_dir = make_hf(str(root / "tok"), "bytelevel")
    tok = load_tokenizer(tok_dir)
    # (The processor's pixel bounds are not in config.json: the loaded model has the
    # defaults, 56*56 .. 28*28*1280 pixels.)
    vision = qwen2_vl_vision_config(depth=2, embed_dim=32, hidden_size=64, num_heads=4,
                                    mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                                    temporal_patch_size=2)
    text = qwen2_vl_text_config(vocab_size=1024, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512,
                                mrope_section=[2, 3, 3], bos_token_id=tok.bos_id,
                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    cfg = qwen2_vl_config(vision=vision, text=text, image_token_id=tok.image_token_id)
    model = mllm_jax.build_model(cfg)
    params = jax.jit(lambda rng: model.init(rng, *registry.init_inputs(cfg)))(
        jax.random.PRNGKey(3))["params"]
    params = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
    d = str(mllm_jax.save_hf(model, params, root / "model"))
    for name in os.listdir(tok_dir):
        if name != "config.json":
            shutil.copy(os.path.join(tok_dir, name), d)
    pictures = []
    for k, (h, w) in enumerate(SIZES):
        path = root / f"picture{k}.png"
        Image.fromarray(np.random.RandomState(k).randint(0, 255, (h, w, 3), np.uint8)).save(
            path)
        pictures.append(str(path))
    model, params = mllm_jax.load_hf(d)
    return d, pictures, model, params


def conversation(question, picture, k=0):
    return batching.Conversation([{"from": "human", "value": "<image>\n" + question}],
                                 [picture], sample_id=f"q{k}")


def test_prompts_and_patches_follow_the_image(ckpt):
    d, pictures, model, _ = ckpt
    tok = load_tokenizer(d)
    inputs = batching.image_inputs_for(model)
    for k, (picture, (h, w)) in enumerate(zip(pictures, SIZES)):
        conv = conversation(QUESTIONS[0], picture, k)
        ids = batching.encode_prompt(model, tok, conv, TEMPLATE, image_inputs=inputs)
        n = int(np.sum(ids == model.cfg.image_token_id))
        assert n == registry.tokens_per_image(model.cfg, (h, w))
        (encoded,) = batching.load_pixels(conv, None, inputs)
        patches, grid = qimg.preprocess(Image.open(picture),
                                        qimg.Qwen2VLImageConfig.for_model(model.cfg))
        np.testing.assert_array_equal(encoded["patches"], patches)
        assert inputs.tokens_of(encoded) == n == grid[1] * grid[2] // 4
    assert registry.tokens_per_image(model.cfg, SIZES[0]) != \
        registry.tokens_per_image(model.cfg, SIZES[1])


def _image_runs(ids, image_id):
    """[(start, end)] of the runs of image tokens in `ids`."""
    runs, k, ids = [], 0, list(ids)
    while k < len(ids):
        if ids[k] == image_id:
            end = k
            while end < len(ids) and ids[end] == image_id:
                end += 1
            runs.append((k, end))
            k = end
        else:
            k += 1
    return runs


def wrapped(ids, tok, image_id):
    """How many images `ids` hold, each checked to sit between <|vision_start|> and
    <|vision_end|>, as Qwen2-VL's chat template writes an image."""
    start = tok.encode("<|vision_start|>", add_bos=False)
    end = tok.encode("<|vision_end|>", add_bos=False)
    ids = list(ids)
    runs = _image_runs(ids, image_id)
    for a, b in runs:
        assert ids[a - len(start):a] == start and ids[b:b + len(end)] == end, (a, b)
    return len(runs)


def test_prompts_write_images_between_vision_start_and_end(ckpt):
    """After the template's placement (training examples: the training test below)."""
    from mllm_jax.data.templates import get_template
    d, pictures, model, _ = ckpt
    tok = load_tokenizer(d)
    assert registry.image_text(model.cfg) == "<|vision_start|><image><|vision_end|>"

    conv = batching.Conversation([{"from": "human", "value": "What is <image> here?"}],
                                 [pictures[0]])
    ids = batching.encode_prompt(model, tok, conv, get_template(TEMPLATE, "llava"))
    assert wrapped(ids, tok, model.cfg.image_token_id) == 1
    text = tok.decode([i for i in ids if i != model.cfg.image_token_id])
    assert "<|vision_start|><|vision_end|>\nWhat is  here?" in text


def test_batched_answers_equal_single(ckpt):
    d, pictures, model, params = ckpt
    tok = load_tokenizer(d)
    convs = [conversation(q, p, k) for k, (q, p) in enumerate(zip(QUESTIONS, pictures))]
    batched = batching.generate_all(model, params, tok, None, convs, TEMPLATE, batch_size=2,
                                    max_new_tokens=6)
    single = batching.generate_all(model, params, tok, None, convs, TEMPLATE, batch_size=1,
                                   max_new_tokens=6)
    assert batched == single
    assert any(batched)


@pytest.fixture(scope="module")
def data_file(ckpt):
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


def test_training_batches_row_by_row_with_the_hf_layout_loss(ckpt, data_file):
    d, _, model, params = ckpt
    c = recipe.base("tiny-llava")
    c.model = model.cfg
    c.data.update(source="llava_json", json=data_file, image_root=os.path.dirname(data_file),
                  tokenizer=d, template=TEMPLATE, max_length=160, images=2, workers=0)
    c.train.update(global_batch_size=4)
    data = make_data(c, 0, 1)
    b = next(data)
    ids = list(data.last_sample_ids)
    assert b["pixel_values"].ndim == 3 and b["image_grid_thw"].shape[0] == 4
    rows, grids = [], []
    for row, sample in enumerate(ids):
        sizes = [SIZES[i] for i in SAMPLES[int(sample[1:])][0]]
        want = sum(registry.tokens_per_image(model.cfg, s) for s in sizes)
        assert int(np.sum(b["input_ids"][row] == model.cfg.image_token_id)) == want
        assert wrapped(b["input_ids"][row], load_tokenizer(d), model.cfg.image_token_id) == \
            len(sizes)
        g = b["image_grid_thw"][row, :len(sizes)]
        assert not b["image_grid_thw"][row, len(sizes):].any()
        n = int(np.prod(g, axis=-1).sum())
        rows.append(b["pixel_values"][row, :n])
        assert not b["pixel_values"][row, n:].any()
        grids.append(g)
    exact = {**b, "pixel_values": np.concatenate(rows), "image_grid_thw": np.concatenate(grids)}
    loss = jax.jit(lambda p, x: step_lib.lm_objective(model, p, x, None)[:2])
    ours = [float(v) for v in loss(params, {k: v for k, v in b.items() if k != "sample_ids"})]
    ref = [float(v) for v in loss(params, {k: v for k, v in exact.items()
                                           if k != "sample_ids"})]
    assert ours[1] == ref[1] > 0
    assert abs(ours[0] / ours[1] - ref[0] / ref[1]) <= 1e-5


def test_checkpoint_processor_config_sets_the_pixel_bounds(ckpt, tmp_path):
    """A checkpoint's preprocessor_config.json as transformers 5 saves it (size.shortest_edge
    / longest_edge) read through the family's `image_config`: token counts and patches
    follow its bounds, as HF's processor's do."""
    from transformers import Qwen2VLImageProcessorPil
    d, pictures, model, _ = ckpt
    assert registry.image_config(model.cfg, str(tmp_path)) is None
    hf = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                  min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 40)
    hf.save_pretrained(str(tmp_path))
    image_cfg = registry.image_config(model.cfg, str(tmp_path))
    assert (image_cfg.min_pixels, image_cfg.max_pixels) == (256, 2560)
    inputs = registry.image_inputs(model.cfg, image_cfg)
    for picture, (h, w) in zip(pictures, SIZES):
        image = Image.open(picture)
        want = hf(images=image, return_tensors="np")
        encoded = inputs.encode(image)
        np.testing.assert_array_equal(encoded["grid"], want["image_grid_thw"][0])
        np.testing.assert_allclose(encoded["patches"], want["pixel_values"], atol=1e-5)
        assert inputs.tokens((h, w)) == inputs.tokens_of(encoded) == \
            int(np.prod(want["image_grid_thw"][0])) // 4
    # chat / generate / eval read the checkpoint's processor config the same way.
    from mllm_jax.infer.batching import image_config_for
    assert image_config_for(model, str(tmp_path)) == image_cfg


def test_train_from_llava_json_on_two_data_devices(ckpt, data_file, tmp_path):
    """`train` on LLaVA-format JSON: a Qwen2-VL stage-2 step over a batch sharded on two
    data-parallel devices (rows with their images) starts from the HF-layout loss."""
    from mllm_jax.train.loop import train
    d, _, model, params = ckpt
    c = recipe.base("tiny-llava")
    c.model = model.cfg
    c.init.hf_checkpoint = d
    c.stage.update(name="stage2", trainable=[r"^visual/merger/", r"^model/"])
    c.train.update(global_batch_size=4, num_steps=1, lr=1e-3, warmup_ratio=0.0, log_every=1,
                   checkpoint_every=10, async_checkpointing=False, export_final=False)
    c.data.update(source="llava_json", json=data_file, image_root=os.path.dirname(data_file),
                  tokenizer=d, template=TEMPLATE, max_length=160, images=2, workers=0)
    c.mesh.update(data=2, fsdp=1, tensor=1)
    b = next(make_data(c, 0, 1))
    total, n, _ = jax.jit(lambda p, x: step_lib.lm_objective(model, p, x, None))(
        params, {k: v for k, v in b.items() if k != "sample_ids"})
    summary = train(c, str(tmp_path / "run"), log=lambda *_: None, devices=jax.devices()[:2])
    assert summary["step"] == 1
    assert summary["losses"][0] == pytest.approx(float(total) / float(n), rel=1e-5, abs=1e-6)
