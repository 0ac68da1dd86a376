"""Batched generation and the `mllm-jax eval` runner on a tiny random LLaVA checkpoint."""
import numpy as np
import pytest
from PIL import Image

from mllm_jax.convert import load_hf
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer import batching
from mllm_jax.infer.prompting import Session, image_config_for
from test_chat import ckpt  # noqa: F401  (the module-scoped tiny checkpoint fixture)

TEMPLATE = "chatml"


@pytest.fixture(scope="module")
def loaded(ckpt):  # noqa: F811
    d, _ = ckpt
    model, params = load_hf(d)
    return model, params, load_tokenizer(d), image_config_for(model, d)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for k, shape in enumerate([(32, 32, 3), (20, 44, 3), (50, 26, 3)]):
        path = root / f"COCO_val2014_{k:012d}.png"
        Image.fromarray(np.random.RandomState(10 + k).randint(0, 255, shape, np.uint8)).save(
            path)
        paths.append(str(path))
    return paths


def test_left_pad_rounds_up_and_right_aligns():
    ids, mask = batching.left_pad([np.array([5, 6, 7]), np.array([9])], pad_id=0, multiple=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 9]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_batch_answers_equal_one_at_a_time(ckpt, loaded, pictures):  # noqa: F811
    d, _ = ckpt
    model, params, tok, image_cfg = loaded
    questions = ["what is it?", "Is there a dog in the picture? Answer in one word please.",
                 "what colour is the sky there?"]
    conversations = [batching.Conversation([{"from": "human", "value": "<image>\n" + q}],
                                           [p], sample_id=k)
                     for k, (q, p) in enumerate(zip(questions, pictures))]
    lengths = {len(batching.encode_prompt(model, tok, c, TEMPLATE)) for c in conversations}
    assert len(lengths) == 3
    batched = batching.generate_batch(model, params, tok, image_cfg, conversations, TEMPLATE,
                                      max_new_tokens=6)
    single = [Session(model, params, d, TEMPLATE, max_new_tokens=6).ask(q, [p])
              for q, p in zip(questions, pictures)]
    assert batched == single
    assert any(single)
