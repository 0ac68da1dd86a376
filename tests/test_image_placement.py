"""`image_placement="llava"`: conversations placed and tokenized as LLaVA's training code does.

The reference ids and labels below come from running LLaVA's own functions (the llava-torch
1.2.2.post1 package: `llava.train.train.preprocess_multimodal`, then `preprocess_v1`,
`preprocess_llama_2` or `preprocess_plain` with `conversation_lib.default_conversation` set to
"v1", "llava_llama_2" or "plain", `mm_use_im_start_end=False`; transformers 4.37.2,
tokenizers 0.15.2) on the conversations of this file, with the "sp_legacy" tokenizer of the
`tokenizers` fixture: `test_templates.make_sentencepiece(dir, legacy=True)`, loaded there with
`AutoTokenizer.from_pretrained(dir, use_fast=False)` as LLaVA's train() loads it.

Image tokens. LLaVA's `tokenizer_image_token` puts IMAGE_TOKEN_INDEX (-200) where an image
goes, one id per image, and expands it inside the model. The references are compared with
our examples built with `image_tokens_per_image=1`, their -200 mapped to the tokenizer's
image-token id (our single placeholder before expansion); `test_images_expand_in_place`
checks the expansion to several tokens per image.

What the references leave out, on purpose:
  - `legacy: false` tokenizers. LLaVA tokenizes the text between images piece by piece, each
    piece as the start of a text, so its ids have a dummy-prefix "▁" after every image; the
    whole-text tokenization here (and HF's) reads text after a special token without it
    unless the tokenizer is legacy. LLaVA's `preprocess_v1` also masks every label of these
    conversations with such a tokenizer (its "tokenization mismatch" warning).
  - A message holding only an image (`ALONE`). LLaVA places it as we do (compared below as
    text), but the text after the image then starts with a space, which transformers
    4.37's slow LlamaTokenizer prefixes with an extra "▁" and later tokenizers (and ours)
    do not.
  - `plain` ends the caption with EOS here; LLaVA's `conv_llava_plain` ends it with its
    separator "\\n". Its references are compared up to that last token.
"""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data import templates as T
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.data.tokens import expand_image_tokens
from mllm_jax.train.losses import IGNORE_INDEX
from test_templates import make_hf, make_sentencepiece

LLAVA_IMAGE = -200  # llava.constants.IMAGE_TOKEN_INDEX

MID = [{"from": "human", "value": "What is <image> in the picture?"},
       {"from": "gpt", "value": "A red cube on a blue floor."},
       {"from": "human", "value": "How many cubes are there?"},
       {"from": "gpt", "value": "There are 3 cubes, two large."}]
END = [{"from": "human", "value": "Describe the image.\n<image>"},
       {"from": "gpt", "value": "A small green cone left of a sphere."},
       {"from": "human", "value": "What color is the cone?"},
       {"from": "gpt", "value": "Green."}]
SPACE = [{"from": "human", "value": "  \n<image>  What is in the picture? \n"},
         {"from": "gpt", "value": "A cat sits next to a dog."},
         {"from": "human", "value": "Is the dog behind the cat?"},
         {"from": "gpt", "value": "No, the dog is on the left."}]
TWO = [{"from": "human", "value": "What is in the picture <image>?"},
       {"from": "gpt", "value": "A red cube."},
       {"from": "human", "value": "And in this one?\n<image>\n"},
       {"from": "gpt", "value": "Two blue spheres."}]
ALONE = [{"from": "human", "value": "<image>"},
         {"from": "gpt", "value": "Two blue spheres on the floor."},
         {"from": "human", "value": "How many spheres?"},
         {"from": "gpt", "value": "Two."}]
CONVERSATIONS = {"MID": MID, "END": END, "SPACE": SPACE, "TWO": TWO, "ALONE": ALONE}
CAPTIONS = {"MID": [{"from": "human", "value": "Describe <image> briefly."},
                    {"from": "gpt", "value": "A red cube on a blue floor."}],
            "END": [{"from": "human", "value": "What is this?\n<image>"},
                    {"from": "gpt", "value": "A small green cone left of a sphere."}],
            "SPACE": [{"from": "human", "value": " <image>\n "},
                      {"from": "gpt", "value": "Two blue spheres on the floor."}]}

# The user messages as llava.train.train.preprocess_multimodal leaves them (the same for the
# "v1" and "llava_llama_2" conversation formats).
LLAVA_USER_MESSAGES = {
    "MID": ["<image>\nWhat is  in the picture?", "How many cubes are there?"],
    "END": ["<image>\nDescribe the image.", "What color is the cone?"],
    "SPACE": ["<image>\nWhat is in the picture?", "Is the dog behind the cat?"],
    "TWO": ["<image>\nWhat is in the picture ?", "<image>\nAnd in this one?"],
    "ALONE": ["<image>", "How many spheres?"],
}


def M(n):
    """n masked labels (IGNORE_INDEX, LLaVA's -100)."""
    return [IGNORE_INDEX] * n


# (template, conversation): (input_ids, labels) as LLaVA's functions return them.
LLAVA_REFERENCES = {
    # llava.train.train.preprocess_v1, conversation MID
    ('vicuna_v1', 'MID'): (
        [1, 391, 560, 579, 266, 581, 407, 410, 280, 589, 591, 408, 625, 430, 408, 566, 428, 627,
         585, 627, 410, 574, 578, 307, 279, 407, 661, 609, 588, 625, 558, 629, 603, -200, 603,
         649, 651, 293, 374, 603, 368, 279, 363, 630, 587, 629, 391, 387, 334, 332, 266, 381, 383,
         625, 2, 558, 629, 437, 343, 267, 617, 615, 272, 300, 340, 630, 587, 629, 472, 300, 603,
         633, 267, 617, 615, 272, 627, 378, 355, 625, 2],
        M(46) + [391, 387, 334, 332, 266, 381, 383, 625, 2] + M(13) + [472, 300, 603, 633, 267,
         617, 615, 272, 627, 378, 355, 625, 2]),
    # llava.train.train.preprocess_v1, conversation END
    ('vicuna_v1', 'END'): (
        [1, 391, 560, 579, 266, 581, 407, 410, 280, 589, 591, 408, 625, 430, 408, 566, 428, 627,
         585, 627, 410, 574, 578, 307, 279, 407, 661, 609, 588, 625, 558, 629, 603, -200, 603,
         649, 647, 302, 279, 336, 625, 587, 629, 391, 333, 352, 342, 385, 335, 266, 357, 625, 2,
         558, 629, 432, 369, 374, 279, 342, 630, 587, 629, 492, 625, 2],
        M(43) + [391, 333, 352, 342, 385, 335, 266, 357, 625, 2] + M(10) + [492, 625, 2]),
    # llava.train.train.preprocess_v1, conversation SPACE
    ('vicuna_v1', 'SPACE'): (
        [1, 391, 560, 579, 266, 581, 407, 410, 280, 589, 591, 408, 625, 430, 408, 566, 428, 627,
         585, 627, 410, 574, 578, 307, 279, 407, 661, 609, 588, 625, 558, 629, 603, -200, 603,
         649, 651, 293, 374, 368, 279, 363, 630, 587, 629, 391, 365, 313, 375, 307, 266, 347, 625,
         2, 558, 629, 475, 279, 347, 388, 279, 365, 630, 587, 629, 484, 627, 279, 347, 374, 332,
         279, 385, 625, 2],
        M(45) + [391, 365, 313, 375, 307, 266, 347, 625, 2] + M(11) + [484, 627, 279, 347, 374,
         332, 279, 385, 625, 2]),
    # llava.train.train.preprocess_v1, conversation TWO
    ('vicuna_v1', 'TWO'): (
        [1, 391, 560, 579, 266, 581, 407, 410, 280, 589, 591, 408, 625, 430, 408, 566, 428, 627,
         585, 627, 410, 574, 578, 307, 279, 407, 661, 609, 588, 625, 558, 629, 603, -200, 603,
         649, 651, 293, 374, 368, 279, 363, 603, 630, 587, 629, 391, 387, 334, 625, 2, 558, 629,
         603, -200, 603, 649, 637, 326, 368, 265, 372, 609, 332, 604, 630, 587, 629, 485, 381,
         357, 609, 625, 2],
        M(46) + [391, 387, 334, 625, 2] + M(17) + [485, 381, 357, 609, 625, 2]),
    # llava.train.train.preprocess_llama_2, conversation MID
    ('llama_2', 'MID'): (
        [1, 446, 453, 655, 449, 448, 447, 640, 409, 300, 266, 428, 458, 410, 576, 408, 625, 426,
         300, 559, 307, 590, 279, 577, 580, 562, 279, 407, 586, 627, 410, 573, 279, 407, 563, 266,
         584, 335, 568, 570, 583, 458, 625, 649, 439, 653, 448, 535, -200, 603, 649, 651, 293,
         374, 603, 368, 279, 363, 630, 533, 453, 655, 391, 387, 334, 332, 266, 381, 383, 625, 603,
         2, 1, 446, 453, 655, 437, 343, 267, 617, 615, 272, 300, 340, 630, 533, 453, 655, 472,
         300, 603, 633, 267, 617, 615, 272, 627, 378, 355, 625, 603, 2],
        M(62) + [391, 387, 334, 332, 266, 381, 383, 625, 603, 2] + M(16) + [472, 300, 603, 633,
         267, 617, 615, 272, 627, 378, 355, 625, 603, 2]),
    # llava.train.train.preprocess_llama_2, conversation END
    ('llama_2', 'END'): (
        [1, 446, 453, 655, 449, 448, 447, 640, 409, 300, 266, 428, 458, 410, 576, 408, 625, 426,
         300, 559, 307, 590, 279, 577, 580, 562, 279, 407, 586, 627, 410, 573, 279, 407, 563, 266,
         584, 335, 568, 570, 583, 458, 625, 649, 439, 653, 448, 535, -200, 603, 649, 647, 302,
         279, 336, 625, 533, 453, 655, 391, 333, 352, 342, 385, 335, 266, 357, 625, 603, 2, 1,
         446, 453, 655, 432, 369, 374, 279, 342, 630, 533, 453, 655, 492, 625, 603, 2],
        M(59) + [391, 333, 352, 342, 385, 335, 266, 357, 625, 603, 2] + M(13) + [492, 625, 603,
         2]),
    # llava.train.train.preprocess_llama_2, conversation SPACE
    ('llama_2', 'SPACE'): (
        [1, 446, 453, 655, 449, 448, 447, 640, 409, 300, 266, 428, 458, 410, 576, 408, 625, 426,
         300, 559, 307, 590, 279, 577, 580, 562, 279, 407, 586, 627, 410, 573, 279, 407, 563, 266,
         584, 335, 568, 570, 583, 458, 625, 649, 439, 653, 448, 535, -200, 603, 649, 651, 293,
         374, 368, 279, 363, 630, 533, 453, 655, 391, 365, 313, 375, 307, 266, 347, 625, 603, 2,
         1, 446, 453, 655, 475, 279, 347, 388, 279, 365, 630, 533, 453, 655, 484, 627, 279, 347,
         374, 332, 279, 385, 625, 603, 2],
        M(61) + [391, 365, 313, 375, 307, 266, 347, 625, 603, 2] + M(14) + [484, 627, 279, 347,
         374, 332, 279, 385, 625, 603, 2]),
    # llava.train.train.preprocess_llama_2, conversation TWO
    ('llama_2', 'TWO'): (
        [1, 446, 453, 655, 449, 448, 447, 640, 409, 300, 266, 428, 458, 410, 576, 408, 625, 426,
         300, 559, 307, 590, 279, 577, 580, 562, 279, 407, 586, 627, 410, 573, 279, 407, 563, 266,
         584, 335, 568, 570, 583, 458, 625, 649, 439, 653, 448, 535, -200, 603, 649, 651, 293,
         374, 368, 279, 363, 603, 630, 533, 453, 655, 391, 387, 334, 625, 603, 2, 1, 446, 453,
         655, 603, -200, 603, 649, 637, 326, 368, 265, 372, 609, 332, 604, 630, 533, 453, 655,
         485, 381, 357, 609, 625, 603, 2],
        M(62) + [391, 387, 334, 625, 603, 2] + M(20) + [485, 381, 357, 609, 625, 603, 2]),
    # llava.train.train.preprocess_plain, conversation MID
    ('plain', 'MID'): (
        [1, -200, 391, 387, 334, 332, 266, 381, 383, 625, 649],
        M(2) + [391, 387, 334, 332, 266, 381, 383, 625, 649]),
    # llava.train.train.preprocess_plain, conversation END
    ('plain', 'END'): (
        [1, -200, 391, 333, 352, 342, 385, 335, 266, 357, 625, 649],
        M(2) + [391, 333, 352, 342, 385, 335, 266, 357, 625, 649]),
    # llava.train.train.preprocess_plain, conversation SPACE
    ('plain', 'SPACE'): (
        [1, -200, 485, 381, 357, 609, 332, 279, 383, 625, 649],
        M(2) + [485, 381, 357, 609, 332, 279, 383, 625, 649]),
}

# The vocabulary the references were made with (sha256 of its pieces, one per line).
VOCAB_SHA256 = "b655f16e67a61b05"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    legacy = load_tokenizer(make_sentencepiece(str(root / "sp_legacy"), legacy=True))
    pieces = "\n".join(legacy.id_to_token(i) for i in range(700))
    assert hashlib.sha256(pieces.encode()).hexdigest()[:16] == VOCAB_SHA256, (
        "make_sentencepiece trains another vocabulary than the one LLAVA_REFERENCES were "
        "made with (a new sentencepiece?); the references must be made again")
    return {"sp_legacy": legacy,
            "sp": load_tokenizer(make_sentencepiece(str(root / "sp"), legacy=False)),
            "hf_bytelevel": load_tokenizer(make_hf(str(root / "bytelevel"), "bytelevel"))}


def _llava(ids, tok):
    return [tok.image_token_id if i == LLAVA_IMAGE else i for i in ids]


def _conversation(template, name):
    return (CAPTIONS if template == "plain" else CONVERSATIONS)[name]


# ---- placement ---------------------------------------------------------------------------
def test_user_messages_are_placed_as_preprocess_multimodal_places_them():
    for name, conversation in CONVERSATIONS.items():
        users = [m["value"] for m in conversation if m["from"] == "human"]
        placed = [T.place_images(u.strip(), T.LLAVA) for u in users]
        assert placed == LLAVA_USER_MESSAGES[name], name
        assert [T.place_images(u, T.AS_WRITTEN) for u in users] == users
    # Several images of one message all go first, in order; text without images is kept.
    assert T.place_images("a <image> b <image>", T.LLAVA) == "<image><image>\na  b"
    assert T.place_images(" no image ", T.LLAVA) == " no image "


# ---- token for token with LLaVA ----------------------------------------------------------
@pytest.mark.parametrize("template,name", sorted(LLAVA_REFERENCES))
def test_ids_and_labels_equal_llavas(tokenizers, template, name):
    tok = tokenizers["sp_legacy"]
    want_ids, want_labels = (_llava(x, tok) for x in LLAVA_REFERENCES[template, name])
    conversation = _conversation(template, name)
    ex = T.build_example(conversation, template, tok, image_tokens_per_image=1,
                         max_length=4096, sample_id=name, image_placement="llava")
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    if template == "plain":
        # LLaVA's caption ends with its separator "\n", ours with EOS (module doc).
        newline = tok.encode("\n")[-1]
        assert want_ids[-1] == want_labels[-1] == newline
        assert ids[-1] == labels[-1] == tok.eos_id
        want_ids[-1] = want_labels[-1] = tok.eos_id
    assert ids == want_ids
    assert labels == want_labels
    # The placement is what makes them equal: as written, the image stays mid-message.
    if template != "plain":
        as_written = T.build_example(conversation, template, tok, image_tokens_per_image=1,
                                     max_length=4096, sample_id=name)
        assert as_written["input_ids"].tolist() != want_ids


def test_a_message_of_images_alone_renders_as_llava_renders_it(tokenizers):
    """ALONE is compared as text (module doc): "USER: <image> ASSISTANT:"."""
    tok = tokenizers["sp_legacy"]
    text = T.render_text(ALONE, "vicuna_v1", tok, image_placement="llava")
    assert f"USER: <image> ASSISTANT: {ALONE[1]['value']}{tok.eos_token}" in text
    text = T.render_text(ALONE, "llama_2", tok, image_placement="llava")
    assert f"\n<</SYS>>\n\n<image> [/INST] {ALONE[1]['value']} {tok.eos_token}" in text


def test_images_expand_in_place(tokenizers):
    tok = tokenizers["sp_legacy"]
    ref_ids, ref_labels = (_llava(x, tok) for x in LLAVA_REFERENCES["vicuna_v1", "TWO"])
    ex = T.build_example(TWO, "vicuna_v1", tok, image_tokens_per_image=[3, 5],
                         max_length=4096, sample_id="TWO", image_placement="llava")
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    counts = iter([3, 5])
    assert ids == [x for i in ref_ids
                   for x in ([i] * next(counts) if i == tok.image_token_id else [i])]
    assert ex["num_images"] == 2
    assert [x for x in labels if x != IGNORE_INDEX] == [
        x for x in ref_labels if x != IGNORE_INDEX]
    assert all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i == tok.image_token_id)
    one = T.build_example(TWO, "vicuna_v1", tok, image_tokens_per_image=1, max_length=4096,
                          sample_id="TWO", image_placement="llava")["input_ids"].tolist()
    assert expand_image_tokens(one, tok.image_token_id, 4) == T.build_example(
        TWO, "vicuna_v1", tok, image_tokens_per_image=4, max_length=4096, sample_id="TWO",
        image_placement="llava")["input_ids"].tolist()


# ---- every template ------------------------------------------------------------------------
@pytest.mark.parametrize("tok_name", ["sp_legacy", "sp", "hf_bytelevel"])
@pytest.mark.parametrize("template", sorted(T.TEMPLATES))
def test_every_template_places_images_first(tokenizers, tok_name, template):
    tok = tokenizers[tok_name]
    names = ["MID", "END", "SPACE"] if template == "plain" else ["MID", "SPACE", "TWO", "ALONE"]
    for name in names:
        conversation = _conversation(template, name)
        placed = [dict(m, value=T.place_images(m["value"].strip(), T.LLAVA))
                  if m["from"] == "human" else m for m in conversation]
        # The llava placement renders what the template renders of the placed messages.
        assert T.render_text(conversation, template, tok, image_placement="llava") == \
            T.render_text(placed, template, tok)
        ex = T.build_example(conversation, template, tok, image_tokens_per_image=2,
                             max_length=4096, sample_id=name, image_placement="llava")
        assert ex["input_ids"].tolist() == T.build_example(
            placed, template, tok, image_tokens_per_image=2, max_length=4096,
            sample_id=name)["input_ids"].tolist()
        # The generation prompt is the training prefix, with the same placement.
        ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
        for end in range(1, len(conversation), 2):
            prompt = T.build_prompt(conversation[:end], template, tok, image_tokens_per_image=2,
                                    image_placement="llava").tolist()
            assert ids[:len(prompt)] == prompt
            assert labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]
        # The default is as written, as before the option existed.
        assert T.render_text(conversation, template, tok) == T.render_text(
            conversation, template, tok, image_placement="as_written")
        if template != "plain" and name == "MID":
            assert T.render_text(conversation, template, tok) != T.render_text(
                placed, template, tok)
    # A Template object carries its placement.
    tpl = T.get_template(template, "llava")
    assert tpl.image_placement == "llava" and T.get_template(template).image_placement == \
        "as_written"
    assert T.render_text(MID if template != "plain" else CAPTIONS["MID"], tpl, tok) == \
        T.render_text(MID if template != "plain" else CAPTIONS["MID"], template, tok,
                      image_placement="llava")


# ---- the value is checked --------------------------------------------------------------
def test_an_unknown_placement_names_the_field_the_value_and_the_choices(tokenizers, tmp_path):
    from mllm_jax.data.image import ImageProcessorConfig
    from mllm_jax.data.llava_json import Record
    from mllm_jax.data.pipeline import LlavaPipeline
    from mllm_jax.train import recipe, validate
    tok = tokenizers["sp_legacy"]
    choices = "choose one of 'as_written', 'llava'"
    with pytest.raises(ValueError, match=f"image_placement = 'LLaVA' .*{choices}"):
        T.build_example(MID, "vicuna_v1", tok, image_tokens_per_image=1, max_length=99,
                        sample_id=0, image_placement="LLaVA")
    with pytest.raises(ValueError, match=f"image_placement = 'front' .*{choices}"):
        T.build_prompt(MID[:1], "chatml", tok, image_tokens_per_image=1,
                       image_placement="front")
    with pytest.raises(ValueError, match=f"image_placement = 'x' .*{choices}"):
        T.get_template("llama_2", "x")
    with pytest.raises(ValueError, match=f"image_placement = 'x' .*{choices}"):
        image_cfg = ImageProcessorConfig(mode="crop", size={"shortest_edge": 8}, crop_size=8)
        LlavaPipeline([Record("r", (), MID, 0)], tok, image_cfg, "vicuna_v1", max_length=64,
                      max_images=0, image_tokens_per_image=1, num_workers=0,
                      image_placement="x")
    cfg = recipe.base("tiny-llava")
    assert cfg.data.image_placement == "as_written" and not validate.problems(cfg)
    cfg.data.image_placement = "first"
    assert validate.problems(cfg) == [
        f"data.image_placement = 'first' is not an image placement; {choices}"]


# ---- the training config -----------------------------------------------------------------
def test_the_training_config_reaches_the_examples(tokenizers, tmp_path):
    from mllm_jax.data.sources import make_data
    from mllm_jax.models import registry
    from mllm_jax.train import recipe
    tok_dir = make_sentencepiece(str(tmp_path / "tok"), legacy=True)
    tok = load_tokenizer(tok_dir)
    Image.new("RGB", (20, 16), (200, 30, 30)).save(tmp_path / "red.png")
    with open(tmp_path / "data.json", "w") as f:
        json.dump([{"id": "mid", "image": "red.png", "conversations": MID}], f)
    cfg = recipe.base("tiny-llava")
    cfg.model.image_token_index = tok.image_token_id
    cfg.train.global_batch_size = 1
    cfg.data.update(source="llava_json", json=str(tmp_path / "data.json"), tokenizer=tok_dir,
                    template="vicuna_v1", max_length=128, workers=0, image_placement="llava")
    data = make_data(cfg, 0, 1)
    batch = next(iter(data))
    n = registry.tokens_per_image(cfg.model)
    ex = T.build_example(MID, "vicuna_v1", tok, image_tokens_per_image=n, max_length=128,
                         sample_id="mid", image_placement="llava")
    length = len(ex["input_ids"])
    np.testing.assert_array_equal(batch["input_ids"][0, :length], ex["input_ids"])
    np.testing.assert_array_equal(batch["labels"][0, :length], ex["labels"])
    ids = batch["input_ids"][0].tolist()
    assert ids.index(tok.image_token_id) == LLAVA_REFERENCES["vicuna_v1", "MID"][0].index(
        LLAVA_IMAGE)


def test_resuming_with_another_placement_is_refused():
    from mllm_jax.train import checkpoints, recipe
    cfg = recipe.base("tiny-llava")
    saved = checkpoints.config_json(cfg)
    cfg.data.image_placement = "llava"
    with pytest.raises(checkpoints.ResumeConfigError,
                       match="data.image_placement: 'as_written' in the checkpoint, 'llava'"):
        checkpoints.check_resume_config(saved, cfg, "step 2")
    # A checkpoint written before the field existed placed images as written.
    del saved["data"]["image_placement"]
    with pytest.raises(checkpoints.ResumeConfigError, match="data.image_placement"):
        checkpoints.check_resume_config(saved, cfg, "step 2")
    cfg.data.image_placement = "as_written"
    logged = []
    assert checkpoints.check_resume_config(saved, cfg, "step 2", log=logged.append) is False
    assert not logged


# ---- inference ---------------------------------------------------------------------------
def test_the_recorded_placement_prompts_the_model(tokenizers, tmp_path, monkeypatch):
    from transformers.utils.chat_template_utils import render_jinja_template

    from mllm_jax import presets
    from mllm_jax.infer import batching, chat_template
    from mllm_jax.infer.prompting import Session
    ckpt = make_sentencepiece(str(tmp_path / "ckpt"), legacy=True)
    tok = load_tokenizer(ckpt)
    chat_template.write_chat_template(ckpt, "vicuna_v1", image_placement="llava")
    rec = chat_template.read_chat_template(ckpt)
    assert rec == chat_template.RecordedTemplate("vicuna_v1", None, {}, "llava")
    assert rec.template() == T.get_template("vicuna_v1", "llava")
    assert chat_template.copy_chat_template(ckpt, tmp_path / "export") == rec
    assert chat_template.resolve_template(ckpt, "chatml").image_placement == "as_written"
    # transformers' apply_chat_template renders the exported Jinja with the same placement.
    messages = [{"role": "user" if m["from"] == "human" else "assistant",
                 "content": m["value"]} for m in TWO[:3]]
    with open(os.path.join(ckpt, "tokenizer_config.json")) as f:
        jinja = json.load(f)["chat_template"]
    rendered = render_jinja_template([messages], chat_template=jinja,
                                     add_generation_prompt=True, bos_token=tok.bos_token,
                                     eos_token=tok.eos_token)[0][0]
    assert rendered == tok.bos_token + T.render_text(TWO[:3], "vicuna_v1", tok,
                                                     generation=True, image_placement="llava")

    class Model:  # what Session reads of a model before generating
        cfg = presets.get("tiny-llava")
    Model.cfg.image_token_index = tok.image_token_id
    prompts = []

    def generate_batch(model, params, tokenizer, image_cfg, conversations, template, **kw):
        prompts.append(batching.encode_prompt(model, tokenizer, conversations[0], template,
                                              system=kw.get("system")))
        return ["Two."]

    monkeypatch.setattr(batching, "generate_batch", generate_batch)
    question = "Compare them."
    Session(Model(), None, ckpt).ask(question, images=["a.png", "b.png"])
    Session(Model(), None, ckpt, image_placement="as_written").ask(question, ["a.png", "b.png"])
    n = batching.registry.tokens_per_image(Model.cfg)
    asked = [{"from": "human", "value": "<image>\n<image>\n" + question}]
    for prompt, placement in zip(prompts, ["llava", "as_written"]):
        assert prompt.tolist() == T.build_prompt(
            asked, "vicuna_v1", tok, image_tokens_per_image=n,
            image_placement=placement).tolist()
    assert prompts[0].tolist() != prompts[1].tolist()
    with pytest.raises(ValueError, match="image_placement = 'up'"):
        Session(Model(), None, ckpt, image_placement="up")
