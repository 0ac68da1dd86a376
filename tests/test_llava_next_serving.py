"""LLaVA-NeXT through `generate`, `chat` and `eval`: a saved tiny `llava_next` checkpoint with a
tokenizer and a LlavaNextImageProcessor config answers as transformers'
`LlavaNextForConditionalGeneration.generate` does on `LlavaNextProcessor`'s inputs (built
from the same local tokenizer and image processor); the prompts' image tokens and the
pixels equal the processor's; two images of different aspect ratios batched give the
one-at-a-time answers and the reference greedy tokens.
"""
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoTokenizer, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextProcessor)

import hf_factories as hf
from mllm_jax.cli import main
from mllm_jax.convert import load_hf
from mllm_jax.data import image as image_lib
from mllm_jax.data.templates import render_text
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer import batching
from mllm_jax.infer.prompting import image_config_for
from mllm_jax.models import registry
from test_llava_next import PINPOINTS, image_processor
from test_templates import make_hf

TEMPLATE = "chatml"
SIZES = [(30, 71), (90, 41)]  # (height, width): one wide, one tall
QUESTIONS = ["what is it?", "Is there a dog in the picture?"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint dir, picture paths, HF model, HF processor)."""
    root = tmp_path_factory.mktemp("llava_next_serving")
    tok_dir = make_hf(str(root / "tok"), "bytelevel")
    image_id = load_tokenizer(tok_dir).image_token_id
    torch.manual_seed(5)
    config = LlavaNextConfig(
        vision_config=hf.vision_config(),
        text_config=hf.text_config(vocab_size=1024, initializer_range=0.3),
        image_token_index=image_id, image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=16)
    model = hf.randomize_extras_(LlavaNextForConditionalGeneration(config), seed=6)
    d = str(hf.save(model.eval(), root / "model"))
    for name in os.listdir(tok_dir):
        if name != "config.json":
            shutil.copy(os.path.join(tok_dir, name), d)
    image_processor().save_pretrained(d)
    pictures = []
    for k, (h, w) in enumerate(SIZES):
        path = root / f"picture{k}.png"
        Image.fromarray(np.random.RandomState(k).randint(0, 255, (h, w, 3), np.uint8)).save(
            path)
        pictures.append(str(path))
    ref = LlavaNextForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    processor = LlavaNextProcessor(image_processor=image_processor(),
                                   tokenizer=AutoTokenizer.from_pretrained(d), patch_size=7,
                                   vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    return d, pictures, ref, processor


@pytest.fixture(scope="module")
def loaded(ckpt):
    d = ckpt[0]
    model, params = load_hf(d)
    return model, params, load_tokenizer(d), image_config_for(model, d)


def conversation(question, picture, k=0):
    return batching.Conversation([{"from": "human", "value": "<image>\n" + question}],
                                 [picture], sample_id=k)


def hf_inputs(processor, text, pictures):
    images = [Image.open(p).convert("RGB") for p in pictures]
    return processor(images=images, text=[text], return_tensors="pt")


def hf_answer(ckpt, text, pictures, max_new=MAX_NEW):
    """(new token ids, decoded answer) of transformers' greedy generate."""
    _, _, ref, processor = ckpt
    inputs = hf_inputs(processor, text, pictures)
    tok = load_tokenizer(ckpt[0])
    with torch.no_grad():
        out = ref.generate(**inputs, do_sample=False, max_new_tokens=max_new,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new, batching.decode_answer(tok, new)


def prompt_text(tok, question):
    return render_text([{"from": "human", "value": "<image>\n" + question}], TEMPLATE, tok,
                       generation=True)


def test_prompts_and_pixels_equal_the_hf_processor(ckpt, loaded):
    d, pictures, _, processor = ckpt
    model, _, tok, image_cfg = loaded
    inputs = registry.image_inputs(model.cfg, image_cfg)
    assert inputs.sized
    counts = []
    for question, picture in zip(QUESTIONS, pictures):
        conv = conversation(question, picture)
        ours = batching.encode_prompt(model, tok, conv, TEMPLATE, image_inputs=inputs)
        expected = hf_inputs(processor, prompt_text(tok, question), [picture])
        assert ours.tolist() == expected["input_ids"][0].tolist()
        counts.append(int(np.sum(ours == model.cfg.image_token_index)))
        (encoded,) = batching.load_pixels(conv, image_cfg, inputs)
        np.testing.assert_array_equal(encoded["image_sizes"], expected["image_sizes"][0])
        np.testing.assert_allclose(encoded["pixel_values"],
                                   expected["pixel_values"][0].numpy().transpose(0, 2, 3, 1),
                                   atol=1e-5)
    assert counts[0] != counts[1]
    assert counts == [registry.tokens_per_image(model.cfg, s) for s in SIZES]


def test_batched_answers_equal_single_and_hf(ckpt, loaded, monkeypatch):
    d, pictures, _, _ = ckpt
    model, params, tok, image_cfg = loaded
    convs = [conversation(q, p, k) for k, (q, p) in enumerate(zip(QUESTIONS, pictures))]
    tokens = []
    real = batching.generate

    def recording(*args, **kw):
        out = real(*args, **kw)
        tokens.append(out)
        return out
    monkeypatch.setattr(batching, "generate", recording)
    batched = batching.generate_all(model, params, tok, image_cfg, convs, TEMPLATE,
                                    batch_size=2, max_new_tokens=MAX_NEW)
    single = batching.generate_all(model, params, tok, image_cfg, convs, TEMPLATE,
                                   batch_size=1, max_new_tokens=MAX_NEW)
    assert batched == single
    assert any(batched)
    (rows,) = tokens[:1]
    order = sorted(range(2), key=lambda i: -len(batching.encode_prompt(model, tok, convs[i],
                                                                       TEMPLATE)))
    for row, i in zip(rows, order):
        ids, answer = hf_answer(ckpt, prompt_text(tok, QUESTIONS[i]), [pictures[i]])
        assert row.tolist()[:len(ids)] == ids
        assert batched[i] == answer


def test_cli_generate_and_chat_answer_as_hf(ckpt, loaded, capsys, monkeypatch):
    d, pictures, _, _ = ckpt
    tok = loaded[2]
    assert main(["generate", "--ckpt", d, "--template", TEMPLATE, "--image", pictures[1],
                 "--prompt", QUESTIONS[0], "--max-new-tokens", str(MAX_NEW)]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == hf_answer(ckpt, prompt_text(tok, QUESTIONS[0]), [pictures[1]])[1]
    # The same prompt in a chat (its compiled loop is the one above).
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        f"/image {pictures[1]}\n{QUESTIONS[0]}\n\n"))
    assert main(["chat", "--ckpt", d, "--template", TEMPLATE, "--max-new-tokens",
                 str(MAX_NEW)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == answer


def test_cli_eval_answers_as_hf(ckpt, tmp_path):
    d, pictures, _, _ = ckpt
    data = tmp_path / "coco_pope_random.json"
    with open(data, "w") as f:
        for k, picture in enumerate(pictures):
            shutil.copy(picture, tmp_path / os.path.basename(picture))
            f.write(json.dumps({"question_id": k + 1, "image": os.path.basename(picture),
                                "text": QUESTIONS[1], "label": "no"}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--ckpt", d, "--task", "pope", "--data", str(data), "--output",
                 str(out), "--template", TEMPLATE, "--max-new-tokens", str(MAX_NEW),
                 "--batch-size", "2"]) == 0
    (model_dir,) = os.listdir(out)
    (samples,) = [f for f in os.listdir(out / model_dir) if "_samples_" in f]
    with open(out / model_dir / samples) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2
    for record, picture in zip(records, pictures):
        assert record["resps"] == [hf_answer(ckpt, record["input"], [picture])[1]]


def test_image_sizes_are_read_upright_from_the_header(tmp_path):
    """An EXIF-rotated JPEG's size is the upright image's, as preprocessing sees it."""
    image = Image.fromarray(np.zeros((20, 50, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated a quarter turn
    path = tmp_path / "turned.jpg"
    image.save(path, exif=exif)
    upright = image_lib.apply_exif_orientation(image_lib.read_image(str(path)))
    assert image_lib.read_image_size(str(path)) == (upright.height, upright.width) == (50, 20)
    assert image_lib.read_image_size(str(path), exif_transpose=False) == (20, 50)
    assert batching.read_image_size(path.read_bytes()) == (50, 20)


def test_a_bad_prompt_fails_before_any_image_is_decoded(ckpt, loaded, monkeypatch):
    """Token counts come from the images' headers; decoding waits for the batch."""
    _, pictures, _, _ = ckpt
    model, params, tok, image_cfg = loaded
    monkeypatch.setattr(batching, "read_image", lambda image: pytest.fail("decoded"))
    long = conversation("why? " * model.cfg.text.max_position_embeddings, pictures[0], 1)
    with pytest.raises(ValueError, match="sample 1: .*longer than the model's context"):
        batching.generate_all(model, params, tok, image_cfg, [conversation("hi", pictures[1]),
                                                              long], TEMPLATE,
                              max_new_tokens=2)
