"""`mllm-jax generate` and `chat` on a checkpoint directory holding a model and its
tokenizer: the answer is the greedy continuation of the template's prompt."""
import io
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import hf_factories as hf
from mllm_jax.cli import main
from mllm_jax.convert import load_hf
from mllm_jax.data.templates import build_prompt
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer.generate import generate
from mllm_jax.infer.prompting import image_config_for
from mllm_jax.models import tokens_per_image
from mllm_jax.data import image as image_lib
from test_templates import make_hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok_dir = make_hf(str(root / "tok"), "bytelevel")
    tok = load_tokenizer(tok_dir)
    d = hf.make_llava(str(root / "model"), text_overrides=dict(vocab_size=1024),
                      image_token_index=tok.image_token_id, seed=3)
    for name in os.listdir(tok_dir):
        if name != "config.json":
            shutil.copy(os.path.join(tok_dir, name), d)
    picture = root / "picture.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 30, 3), np.uint8)).save(
        picture)
    return d, str(picture)


def _expected(d, picture, question, max_new):
    model, params = load_hf(d)
    tok = load_tokenizer(d)
    ids = build_prompt([{"from": "human", "value": "<image>\n" + question}], "chatml", tok,
                       image_tokens_per_image=tokens_per_image(model.cfg),
                       image_token_id=model.cfg.image_token_index)
    pix = image_lib.preprocess(image_lib.read_image(picture), image_config_for(model, d))
    out = [int(t) for t in generate(model, params, ids[None], pixel_values=pix[None],
                                    max_new_tokens=max_new, eos_token_id=tok.eos_id)[0]]
    if tok.eos_id in out:
        out = out[:out.index(tok.eos_id)]
    out = [t for t in out if t < tok.vocab_size]
    return tok.decode(out, skip_special=True).strip()


def test_generate_prints_the_greedy_answer(ckpt, capsys):
    d, picture = ckpt
    assert main(["generate", "--ckpt", d, "--template", "chatml", "--image", picture,
                 "--prompt", "what is it?", "--max-new-tokens", "6"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and answer == _expected(d, picture, "what is it?", 6)


def test_chat_keeps_the_conversation(ckpt, capsys, monkeypatch):
    d, picture = ckpt
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        f"/image {picture}\nwhat is it?\nand the colour?\n\n"))
    assert main(["chat", "--ckpt", d, "--template", "chatml", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    first, second = lines[1], lines[2]
    assert first == _expected(d, picture, "what is it?", 5)
    assert second  # the second turn answered, with the first in its prompt
