"""Inputs checked at the door of `demo`, `generate`, `chat` and `eval`: a demo workdir that
holds the user's files is refused, token ids outside the vocabulary and prompts longer than
the context are errors before anything runs, `eval --output` naming a file fails before any
work, and the conversation template recorded in a checkpoint is the one used."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import hf_factories as hf
import mllm_jax
from mllm_jax.cli import main
from mllm_jax.data.templates import TEMPLATES, get_template, render_text
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.demo import pipeline
from mllm_jax.eval.runner import sanitize_model_name
from mllm_jax.eval.tasks.base import SHORT_ANSWER
from mllm_jax.infer import chat_template
from mllm_jax.infer.generate import generate
from test_chat import _expected, ckpt  # noqa: F401  (the module-scoped tiny LLaVA checkpoint)


# ---- demo workdir ------------------------------------------------------------------------

def test_demo_refuses_a_directory_holding_the_users_files(tmp_path, capsys):
    mine = tmp_path / "data" / "mine.txt"
    mine.parent.mkdir()
    mine.write_text("my own data")
    assert main(["demo", "--workdir", str(tmp_path), "--scale", "test"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--overwrite" in err and "empty" in err
    assert mine.read_text() == "my own data"
    assert sorted(os.listdir(tmp_path)) == ["data"]  # nothing written, nothing removed
    assert os.listdir(tmp_path / "data") == ["mine.txt"]


def test_demo_claims_new_empty_and_its_own_directories_and_others_only_when_told(tmp_path):
    new = tmp_path / "new"
    assert pipeline.claim_workdir(str(new)) == str(new)
    assert os.path.isfile(new / pipeline.MARKER)
    (new / "report.md").write_text("an earlier run's report")
    pipeline.claim_workdir(str(new))  # an earlier demo run's workdir: reused
    empty = tmp_path / "empty"
    empty.mkdir()
    pipeline.claim_workdir(str(empty))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        pipeline.claim_workdir(str(theirs))
    assert not os.path.exists(theirs / pipeline.MARKER)
    pipeline.claim_workdir(str(theirs), overwrite=True)
    assert (theirs / "notes.txt").read_text() == "x"  # only the demo's own parts are replaced
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        pipeline.claim_workdir(str(a_file))


# ---- token ids and context length (API) ----------------------------------------------------

CONTEXT = 32
VOCAB = hf.TEXT_DEFAULTS["vocab_size"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = hf.make_llama(tmp_path_factory.mktemp("llama"), seed=6,
                         max_position_embeddings=CONTEXT, initializer_range=0.3)
    return mllm_jax.load_hf(path)


@pytest.mark.parametrize("bad, col", [(VOCAB, 2), (10 ** 6, 1), (-3, 0)])
def test_token_ids_outside_the_vocabulary_are_named(llama, bad, col):
    model, params = llama
    ids = np.array([[5, 7, 9, 11], [4, 6, 8, 10]])
    ids[1, col] = bad
    with pytest.raises(ValueError) as e:
        generate(model, params, ids, max_new_tokens=2, eos_token_id=2)
    msg = str(e.value)
    assert f"input_ids[1, {col}] = {bad}" in msg and f"[0, {VOCAB})" in msg
    assert "vocab_size" in msg


def test_padding_positions_may_hold_any_id(llama):
    model, params = llama
    ids = np.array([[0, 0, 5, 7], [4, 6, 8, 10]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    ref = generate(model, params, ids, mask, max_new_tokens=4, eos_token_id=None)
    for pad in (VOCAB + 5, -1):
        padded = ids.copy()
        padded[0, :2] = pad
        out = generate(model, params, padded, mask, max_new_tokens=4, eos_token_id=None)
        np.testing.assert_array_equal(out, ref)


def test_a_prompt_longer_than_the_context_is_an_error(llama):
    model, params = llama
    ids = np.full((2, CONTEXT + 8), 5)
    mask = np.ones_like(ids)
    mask[0, :10] = 0  # prompt 0 fits (30 tokens); prompt 1 (40) does not
    with pytest.raises(ValueError) as e:
        generate(model, params, ids, mask, max_new_tokens=2, eos_token_id=2)
    msg = str(e.value)
    assert f"prompt 1 is {CONTEXT + 8} tokens long (0 of them image tokens)" in msg
    assert f"context of {CONTEXT} positions" in msg
    out = generate(model, params, ids[:1], mask[:1], max_new_tokens=2, eos_token_id=2)
    assert out.shape == (1, 2)  # the one that fits runs


def test_cli_generate_names_the_prompt_length_and_its_image_tokens(ckpt, capsys):  # noqa: F811
    d, picture = ckpt
    model, _ = mllm_jax.load_hf(d)
    limit = model.cfg.text.max_position_embeddings
    per_image = mllm_jax.models.tokens_per_image(model.cfg)
    assert main(["generate", "--ckpt", d, "--template", "chatml", "--image", picture,
                 "--prompt", "what is it? " * limit, "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert f"({per_image} of them image tokens)" in err and f"context of {limit}" in err


# ---- eval --output -----------------------------------------------------------------------

def test_eval_output_naming_a_file_fails_before_any_work(tmp_path, capsys):
    taken = tmp_path / "results.json"
    taken.write_text("{}")
    args = ["eval", "--ckpt", str(tmp_path / "no_such_checkpoint"), "--task", "pope",
            "--data", str(tmp_path / "no_such_data.json")]
    for output in (taken, taken / "sub"):
        assert main(args + ["--output", str(output)]) == 1
        err = capsys.readouterr().err
        assert f"--output {output}" in err and "is a file" in err
        assert "no_such" not in err  # complained about the output first
    assert taken.read_text() == "{}"
    (tmp_path / "out").mkdir()  # <output>/<model name> is a file
    (tmp_path / "out" / sanitize_model_name(args[2])).write_text("")
    assert main(args + ["--output", str(tmp_path / "out")]) == 1
    assert "is a file" in capsys.readouterr().err


# ---- the recorded chat template ----------------------------------------------------------

class _Tokens:
    bos_token, eos_token, source = "<s>", "</s>", "a stand-in tokenizer"

    def is_special(self, token):
        return True


@pytest.mark.parametrize("name", [n for n in TEMPLATES if chat_template.jinja_template(n)])
def test_the_jinja_chat_template_renders_what_our_template_renders(name):
    from transformers.utils.chat_template_utils import render_jinja_template
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    tok = _Tokens()
    bos = tok.bos_token if get_template(name).add_bos else ""
    for conversation in (
            [{"from": "human", "value": "<image>\nwhat is it? "}],
            [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
             {"from": "human", "value": "q2"}],
            [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q1"},
             {"from": "gpt", "value": " a1 "}, {"from": "human", "value": "q2"},
             {"from": "gpt", "value": "a2"}]):
        generation = conversation[-1]["from"] == "human"
        ours = bos + render_text(conversation, name, tok, generation=generation)
        messages = [{"role": roles[m["from"]], "content": m["value"]} for m in conversation]
        theirs = render_jinja_template([messages], chat_template=chat_template.jinja_template(
            name), add_generation_prompt=generation, bos_token="<s>", eos_token="</s>")[0][0]
        assert theirs == ours


def test_recorded_template_round_trips_and_keeps_the_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert chat_template.read_chat_template(tmp_path) is None
    assert chat_template.resolve_template(tmp_path).name == chat_template.DEFAULT_TEMPLATE
    chat_template.write_chat_template(tmp_path, "mistral", prompt_suffixes={
        "short_answer": ""})
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "</s>" and "[INST]" in cfg["chat_template"]
    rec = chat_template.read_chat_template(tmp_path)
    assert rec == chat_template.RecordedTemplate("mistral", None, {"short_answer": ""})
    assert chat_template.resolve_template(tmp_path) == rec
    assert chat_template.resolve_template(tmp_path, "mistral") == rec
    assert chat_template.resolve_template(tmp_path, "chatml").prompt_suffixes == {}
    assert chat_template.copy_chat_template(tmp_path, tmp_path / "export") == rec
    assert chat_template.read_chat_template(tmp_path / "export") == rec
    assert chat_template.copy_chat_template(tmp_path / "none", tmp_path / "x") is None
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(ValueError, match="unknown kind"):
        chat_template.write_chat_template(tmp_path, "mistral", prompt_suffixes={"x": ""})
    cfg["mllm_jax_template"] = {"name": "no_such_template"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer_config.json: mllm_jax_template"):
        chat_template.read_chat_template(tmp_path)


@pytest.fixture(scope="module")
def recorded(ckpt, tmp_path_factory):  # noqa: F811
    """test_chat's checkpoint (its tokenizer speaks chatml), copied; tests record a
    template in it."""
    d, picture = ckpt
    copy = str(tmp_path_factory.mktemp("recorded") / "model")
    shutil.copytree(d, copy)
    return copy, picture


def test_generate_uses_the_recorded_template(ckpt, recorded, capsys):  # noqa: F811
    d, picture = ckpt
    copy, _ = recorded
    chat_template.write_chat_template(copy, "chatml")
    assert main(["generate", "--ckpt", copy, "--image", picture, "--prompt", "what is it?",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == _expected(d, picture, "what is it?", 6)


def test_eval_uses_the_recorded_template_system_and_suffix(recorded, tmp_path):
    copy, picture = recorded
    chat_template.write_chat_template(copy, "chatml", system="Be brief.",
                                      prompt_suffixes={"short_answer": ""})
    Image.open(picture).save(tmp_path / "scene.png")
    questions = tmp_path / "coco_pope_random.json"
    questions.write_text("".join(json.dumps(
        {"question_id": k, "image": "scene.png", "text": f"is there a {w} in the image?",
         "label": label}) + "\n" for k, (w, label) in enumerate([("dog", "yes"),
                                                                  ("cat", "no")])))
    tok = load_tokenizer(copy)

    def run(*extra):
        out = tmp_path / f"out{len(extra)}"
        assert main(["eval", "--ckpt", copy, "--task", "pope", "--data", str(questions),
                     "--output", str(out), "--max-new-tokens", "2", *extra]) == 0
        (sub,) = os.listdir(out)
        results = next(f for f in os.listdir(out / sub) if f.endswith("_results.json"))
        samples = next(f for f in os.listdir(out / sub) if f.endswith("_pope.jsonl"))
        return (json.loads((out / sub / results).read_text()),
                [json.loads(line) for line in open(out / sub / samples)])

    results, samples = run()
    assert results["config"]["template"] == "chatml"
    assert results["configs"]["pope"]["prompt_suffix"] == ""
    assert samples[0]["input"] == render_text(
        [{"from": "human", "value": "<image>\nis there a dog in the image?"}], "chatml", tok,
        system="Be brief.", generation=True)
    results, samples = run("--template", "vicuna_v1")  # told otherwise
    assert results["config"]["template"] == "vicuna_v1"
    assert samples[0]["input"] == render_text(
        [{"from": "human", "value": "<image>\nis there a dog in the image?" + SHORT_ANSWER}],
        "vicuna_v1", tok, generation=True)


def test_generation_past_a_learned_position_table_is_an_error():
    """OPT's positions are rows of a table: prompt + new tokens must fit in it, where a
    rotary decoder would read past nothing."""
    import jax
    from flax.linen import meta

    from mllm_jax import config as mc
    from mllm_jax.models.decoders.opt import opt_text_config
    cfg = mc.llm_config(opt_text_config(vocab_size=64, hidden_size=16, ffn_dim=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=16))
    model = mllm_jax.build_model(cfg)
    params = meta.unbox(model.init(jax.random.PRNGKey(0),
                                   *mllm_jax.models.init_inputs(cfg))["params"])
    ids = np.full((2, 10), 5)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # the longest prompt is row 1's 10 tokens
    with pytest.raises(ValueError) as e:
        generate(model, params, ids, mask, max_new_tokens=7, eos_token_id=None)
    msg = str(e.value)
    assert "longest prompt (10 tokens) plus max_new_tokens=7 needs 17 positions" in msg
    assert "learned table of 16 (max_position_embeddings)" in msg and "at most 6" in msg
    out = generate(model, params, ids, mask, max_new_tokens=6, eos_token_id=None)
    assert out.shape == (2, 6) and np.all((out >= 0) & (out < 64))
