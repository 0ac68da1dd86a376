"""Batched generation and the `mllm-jax eval` runner on a tiny random LLaVA checkpoint."""
import argparse
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from mllm_jax.cli import main
from mllm_jax.convert import load_hf
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.eval import runner, tasks
from mllm_jax.infer import batching
from mllm_jax.infer.generate import place_on_mesh
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
    """Left padding, length buckets and images stacked across prompts leave greedy answers
    as they are one prompt at a time (one prompt holds two images)."""
    d, _ = ckpt
    model, params, tok, image_cfg = loaded
    questions = ["what is it?", "Is there a dog in the picture? Answer in one word please.",
                 "what colour is the sky there?", "which one is brighter?"]
    images = [[pictures[0]], [pictures[1]], [pictures[2]], [pictures[2], pictures[0]]]
    conversations = [batching.Conversation(
        [{"from": "human", "value": "<image>\n" * len(ims) + q}], ims, sample_id=k)
        for k, (q, ims) in enumerate(zip(questions, images))]
    lengths = {len(batching.encode_prompt(model, tok, c, TEMPLATE)) for c in conversations}
    assert len(lengths) == 4
    batched = batching.generate_batch(model, params, tok, image_cfg, conversations, TEMPLATE,
                                      max_new_tokens=6)
    single = [Session(model, params, d, TEMPLATE, max_new_tokens=6).ask(q, ims)
              for q, ims in zip(questions, images)]
    assert batched == single
    assert any(single)


def test_stop_strings_end_and_are_cut_from_answers(ckpt, loaded, pictures):  # noqa: F811
    model, params, tok, image_cfg = loaded
    conv = [batching.Conversation([{"from": "human", "value": "<image>\nwhat is it?"}],
                                  [pictures[0]], sample_id=0)]
    free = batching.generate_batch(model, params, tok, image_cfg, conv, TEMPLATE,
                                   max_new_tokens=8)[0]
    assert len(free) >= 4 and free[2:4].isprintable(), free
    stop = free[2:4]
    cut = batching.generate_batch(model, params, tok, image_cfg, conv, TEMPLATE,
                                  max_new_tokens=8, stop_strings=[stop])[0]
    assert cut == free.split(stop, 1)[0].strip()
    ids = tok.encode("yes ### and more")
    assert batching.decode_answer(tok, ids, ["###"]) == "yes"
    assert batching.stop_sequences(tok, ["###"]) == [[t for t in tok.encode("###")
                                                      if t != tok.bos_id]]
    with pytest.raises(ValueError, match="empty"):
        batching.stop_sequences(tok, [""])


# ---- the runner --------------------------------------------------------------------------

QUESTIONS = ["Is there a dog in the image?", "Is there a person in the image?",
             "Is there a chair in the image?", "Is there a car in the image?"]
LABELS = ["yes", "no", "no", "yes"]


@pytest.fixture(scope="module")
def pope_file(pictures):
    """A POPE question file (JSON lines) over the three pictures, four questions."""
    root = os.path.dirname(pictures[0])
    path = os.path.join(root, "coco_pope_random.json")
    with open(path, "w") as f:
        for k, (q, label) in enumerate(zip(QUESTIONS, LABELS)):
            f.write(json.dumps({"question_id": k + 1, "image": os.path.basename(pictures[k % 3]),
                                "text": q, "label": label}) + "\n")
    return path


def _options(ckpt_dir, data, output, **changes):
    settings = dict(ckpt=ckpt_dir, task="pope", data=data, output=str(output),
                    template=TEMPLATE, max_new_tokens=3, batch_size=2)
    return runner.EvalOptions(**{**settings, **changes})


def _run(options, loaded, monkeypatch):
    if len(loaded) == 4:  # one device
        loaded = (*loaded, None)
    monkeypatch.setattr(runner, "load_runtime", lambda a: loaded)
    assert runner.main(options) == 0
    (model_dir,) = os.listdir(options.output)
    files = sorted(os.listdir(os.path.join(options.output, model_dir)))
    assert len(files) == 2 and files[0].endswith("_results.json"), files
    date = files[0][:-len("_results.json")]
    assert files[1] == f"{date}_samples_pope.jsonl"
    with open(os.path.join(options.output, model_dir, files[0])) as f:
        results = json.load(f)
    with open(os.path.join(options.output, model_dir, files[1])) as f:
        records = [json.loads(line) for line in f]
    assert results["date"] == date
    return model_dir, results, records


def test_runner_writes_lmms_eval_layout_with_the_tasks_scores(  # noqa: F811
        ckpt, loaded, pope_file, tmp_path, monkeypatch, capsys):
    d, _ = ckpt
    options = _options(d, pope_file, tmp_path / "out", limit=3)
    model_dir, results, records = _run(options, loaded, monkeypatch)
    parent, name = os.path.split(os.path.normpath(ckpt[0]))
    assert model_dir == f"{os.path.basename(parent)}__{name}"  # the path's last two parts
    assert results["n-samples"] == {"pope": {"original": 4, "effective": 3}}
    assert results["n-shot"] == {"pope": 0}
    assert results["config"]["batch_size"] == 2 and results["config"]["limit"] == 3
    assert results["configs"]["pope"]["generation_kwargs"] == {"max_new_tokens": 3}
    assert "samples" not in results and set(results["task_hashes"]) == {"pope"}

    task = tasks.get_task("pope")
    samples = task.load(pope_file)[:3]
    assert [r["doc_id"] for r in records] == [s.doc_id for s in samples]
    for r, s in zip(records, samples):
        assert r["doc"]["sample_id"] == s.sample_id and r["target"] == s.target
        assert r["resps"] == [r["filtered_resps"]]
        assert r["arguments"] == [r["input"], {"max_new_tokens": 3}]
        assert r["input"].count("<image>") == 1 and s.question in r["input"]
        assert r["input_media"] == s.images
        processed = task.process_result(s, r["filtered_resps"])
        assert {k: r[k] for k in processed} == processed
    expected = task.aggregate([task.process_result(s, r["filtered_resps"])
                               for s, r in zip(samples, records)], samples)
    entry = results["results"]["pope"]
    assert entry["alias"] == "pope"
    assert {k for k in entry if k != "alias"} == {
        f"{m}{part},none" for m in expected for part in ("", "_stderr")}
    for metric, value in expected.items():
        assert entry[f"{metric},none"] == pytest.approx(value)
        assert entry[f"{metric}_stderr,none"] == "N/A"  # not a mean of per-sample values
    out = capsys.readouterr().out
    assert "|pope" in out and "pope_accuracy" in out and "wrote " in out


def test_fewshot_prompt_has_k_demonstrations_and_k_plus_1_images(  # noqa: F811
        ckpt, loaded, pope_file, tmp_path, monkeypatch):
    d, _ = ckpt
    options = _options(d, pope_file, tmp_path / "out", limit=2, num_fewshot=2, seed=5)
    _, results, records = _run(options, loaded, monkeypatch)
    assert results["n-shot"] == {"pope": 2}
    pool = tasks.get_task("pope").load(pope_file)
    suffix = tasks.get_task("pope").prompt_suffix
    for query, r in enumerate(records):
        demos = runner.fewshot_indices(len(pool), query, 2, seed=5)
        assert query not in demos and len(set(demos)) == 2
        assert r["input_media"] == [pool[i].images[0] for i in demos] + pool[query].images
        text = r["input"]
        assert text.count("<image>") == 3
        # Each demonstration is image, question, suffix and its answer, in draw order, and
        # the query comes last without an answer.
        positions = [text.index(f"<image>\n{pool[i].question}{suffix}\n{pool[i].target}\n\n")
                     for i in demos]
        assert positions == sorted(positions)
        assert text.index(f"<image>\n{pool[query].question}") > positions[-1]
        assert r["resps"] and isinstance(r["filtered_resps"], str)
    assert runner.fewshot_indices(4, 1, 2, seed=5) == runner.fewshot_indices(4, 1, 2, seed=5)
    with pytest.raises(ValueError, match="needs at least 4 samples"):
        runner.fewshot_indices(3, 0, 3, seed=0)


def test_cot_asks_for_reasoning_and_scores_the_answer_after_it(  # noqa: F811
        ckpt, loaded, pope_file, tmp_path, monkeypatch):
    d, _ = ckpt
    seen = {}

    def fake_generate_all(model, params, tokenizer, image_cfg, conversations, template, **kw):
        seen["messages"] = [c.messages for c in conversations]
        seen["max_new_tokens"] = kw["max_new_tokens"]
        return ["The image shows no such thing, so yes is wrong.\nAnswer: No."] * len(
            conversations)

    monkeypatch.setattr(batching, "generate_all", fake_generate_all)
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    options = runner.EvalOptions.from_args(parser.parse_args(
        ["--ckpt", d, "--task", "pope", "--data", pope_file, "--output",
         str(tmp_path / "out"), "--template", TEMPLATE, "--cot"]))
    _, results, records = _run(options, loaded, monkeypatch)
    assert seen["max_new_tokens"] == runner.COT_MAX_NEW_TOKENS
    for messages in seen["messages"]:
        assert messages[0]["value"].endswith(runner.COT_INSTRUCTION)
        assert tasks.SHORT_ANSWER not in messages[0]["value"]
    assert [r["filtered_resps"] for r in records] == ["No."] * 4
    assert all(r["pope"]["prediction"] == "no" for r in records)
    entry = results["results"]["pope"]
    assert entry["pope_yes_ratio,none"] == 0.0 and entry["pope_accuracy,none"] == 0.5
    assert results["configs"]["pope"]["cot"] is True
    pool = tasks.get_task("pope").load(pope_file)
    conversation = runner.build_conversation(tasks.get_task("pope"), pool, 0, demos=[2],
                                             suffix=runner.COT_INSTRUCTION, cot=True)
    assert conversation.messages[0]["value"] == (
        f"<image>\n{QUESTIONS[2]}{runner.COT_INSTRUCTION}\nAnswer: no\n\n"
        f"<image>\n{QUESTIONS[0]}{runner.COT_INSTRUCTION}")
    assert conversation.images == [pool[2].images[0], pool[0].images[0]]
    # Tasks whose answer is the whole response keep their prompt under --cot.
    assert not runner.uses_cot(options, tasks.get_task("coco_caption"))


def test_lmms_eval_scoring_reaches_the_results_samples_and_table(  # noqa: F811
        ckpt, loaded, pope_file, tmp_path, monkeypatch, capsys):
    d, _ = ckpt
    answers = ["Yes", "No.", "no", "yes"]  # "No." is neither yes nor no for lmms-eval
    monkeypatch.setattr(batching, "generate_all", lambda *a, **kw: answers[:len(a[4])])
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    options = runner.EvalOptions.from_args(parser.parse_args(
        ["--ckpt", d, "--task", "pope", "--data", pope_file, "--output",
         str(tmp_path / "out"), "--template", TEMPLATE, "--scoring", "lmms_eval"]))
    _, results, records = _run(options, loaded, monkeypatch)
    assert results["config"]["scoring"] == "lmms_eval"
    assert results["configs"]["pope"]["scoring"] == "lmms_eval"
    entry = results["results"]["pope"]
    assert entry["pope_accuracy,none"] == 0.75  # labels yes, no, no, yes
    assert entry["pope_recall,none"] == 1.0 and entry["pope_yes_ratio_of_labels,none"] == 0.5
    assert "pope_yes_ratio,none" not in entry
    assert [r["pope"]["score"] for r in records] == [1.0, 0.0, 1.0, 1.0]
    assert records[1]["pope"]["prediction"] == "no."
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("|Tasks"))
    assert "|Scoring" in header and "scoring: lmms_eval" in table
    assert any("|lmms_eval|pope_yes_ratio_of_labels" in line for line in table.splitlines())
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "pope", "--data", "p.json", "--scoring", "lmms"])
    err = capsys.readouterr().err
    assert "--scoring" in err and "'official', 'lmms_eval'" in err


def test_the_recorded_image_placement_prompts_the_benchmark(  # noqa: F811
        ckpt, loaded, pope_file, tmp_path, monkeypatch):
    """A checkpoint trained with image_placement="llava" is prompted with it: generation and
    the prompts shown in the samples file get the template with that placement."""
    import shutil

    from mllm_jax.infer.chat_template import write_chat_template
    d = str(tmp_path / "ckpt")
    shutil.copytree(ckpt[0], d)
    write_chat_template(d, TEMPLATE, image_placement="llava")
    seen = []

    def fake_generate_all(model, params, tokenizer, image_cfg, conversations, template, **kw):
        seen.append(template)
        return ["yes"] * len(conversations)

    monkeypatch.setattr(batching, "generate_all", fake_generate_all)
    options = _options(d, pope_file, tmp_path / "out", template=None, limit=1)
    _, _, records = _run(options, loaded, monkeypatch)
    (template,) = seen
    assert template.name == TEMPLATE and template.image_placement == "llava"
    assert f"<|im_start|>user\n<image>\n{QUESTIONS[0]}" in records[0]["input"]


def test_bad_inputs_name_the_task_sample_and_file(ckpt, loaded, pope_file, tmp_path,  # noqa: F811
                                                  monkeypatch):
    d, _ = ckpt
    monkeypatch.setattr(runner, "load_runtime", lambda a: (*loaded, None))
    with pytest.raises(ValueError, match="unknown eval task 'popee'"):
        runner.evaluate(_options(d, pope_file, tmp_path, task="popee"))
    with pytest.raises(FileNotFoundError, match=r"task 'pope': data .*nowhere.json"):
        runner.evaluate(_options(d, str(tmp_path / "nowhere.json"), tmp_path))
    with pytest.raises(ValueError, match="2 path"):
        runner.evaluate(_options(d, f"{pope_file},{pope_file}", tmp_path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data = tmp_path / "coco_pope_random.json"
    data.write_text(json.dumps({"question_id": 7, "image": "broken.png", "text": "Is it?",
                                "label": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"task 'pope': sample '7': cannot read image "
                                         r".*broken.png"):
        runner.evaluate(_options(d, str(data), tmp_path))


def test_bad_option_values_raise_naming_the_option(capsys):
    with pytest.raises(ValueError, match=r"--batch-size must be >= 1, got 0 "
                                         r"\(EvalOptions.batch_size\)"):
        runner.EvalOptions(ckpt="ckpt", task="pope", data="pope.json", batch_size=0)
    with pytest.raises(ValueError, match="--num-fewshot must be >= 0"):
        runner.EvalOptions(ckpt="ckpt", task="pope", data="pope.json", num_fewshot=-1)
    with pytest.raises(ValueError, match="--num-beams must be >= 1"):
        runner.EvalOptions(ckpt="ckpt", task="pope", data="pope.json", num_beams=0)
    with pytest.raises(ValueError, match="needs --ckpt"):
        runner.EvalOptions(task="pope", data="pope.json")
    with pytest.raises(TypeError, match="EvalOptions.from_args"):
        runner.evaluate(argparse.Namespace(ckpt="ckpt", task="pope", data="pope.json"))
    # On the command line the same check fails before anything is loaded.
    assert main(["eval", "--ckpt", "ckpt", "--task", "pope", "--data", "pope.json",
                 "--batch-size", "0"]) == 1
    assert "--batch-size must be >= 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gqa_file(pictures):
    """A GQA question file over two of the pictures (as JPEGs named by image id)."""
    root = os.path.join(os.path.dirname(pictures[0]), "gqa")
    os.makedirs(root, exist_ok=True)
    questions = {}
    for k, (picture, answer) in enumerate(zip(pictures[:2], ["left", "red"])):
        Image.open(picture).convert("RGB").save(os.path.join(root, f"n{k}.jpg"))
        questions[f"q{k}"] = {"imageId": f"n{k}", "question": f"Question {k}?",
                              "answer": answer}
    path = os.path.join(root, "testdev_balanced_questions.json")
    with open(path, "w") as f:
        json.dump(questions, f)
    return path


def test_cli_eval_writes_results(ckpt, pope_file, gqa_file, tmp_path, capsys):  # noqa: F811
    d, _ = ckpt
    out = tmp_path / "out"
    assert main(["eval", "--ckpt", d, "--task", "pope,gqa", "--data", f"{pope_file},{gqa_file}",
                 "--output", str(out), "--template", TEMPLATE, "--limit", "2",
                 "--max-new-tokens", "2", "--batch-size", "2", "--num-beams", "2"]) == 0
    (model_dir,) = os.listdir(out)
    files = sorted(os.listdir(out / model_dir))
    date = files[0][:15]
    assert files == [f"{date}_results.json", f"{date}_samples_gqa.jsonl",
                     f"{date}_samples_pope.jsonl"]
    with open(out / model_dir / files[0]) as f:
        results = json.load(f)
    assert results["date"] == date
    assert results["n-samples"] == {"pope": {"original": 4, "effective": 2},
                                    "gqa": {"original": 2, "effective": 2}}
    assert results["configs"]["pope"]["generation_kwargs"] == {
        "max_new_tokens": 2, "num_beams": 2, "length_penalty": 1.0}
    assert 0.0 <= results["results"]["pope"]["pope_accuracy,none"] <= 1.0
    with open(out / model_dir / files[1]) as f:
        gqa = [json.loads(line)["exact_match"] for line in f]
    # GQA's accuracy is the mean of the per-sample scores: its stderr is the mean's.
    entry = results["results"]["gqa"]
    assert entry["exact_match,none"] == pytest.approx(np.mean(gqa))
    assert entry["exact_match_stderr,none"] == pytest.approx(np.std(gqa, ddof=1) / np.sqrt(2))
    printed = capsys.readouterr().out
    assert str(out / model_dir / files[0]) in printed and "|gqa" in printed
    assert main(["eval", "--ckpt", d, "--task", "nope", "--data", pope_file,
                 "--output", str(out)]) == 1
    assert "unknown eval task 'nope'" in capsys.readouterr().err


def test_demonstration_answers_and_mean_stderr():
    Sample = tasks.Sample
    vqa = Sample(0, "1", [], "q", ["two", "2", "two", "three"], {})
    assert runner.answer_text(tasks.get_task("vqav2"), vqa) == "two"  # the most common
    sqa = Sample(0, "2", [], "q", 2, {"num_options": 3})
    assert runner.answer_text(tasks.get_task("scienceqa"), sqa) == "C"
    chair = Sample(0, "3", [], "", ["dog", "person"], {"captions": ["A dog and a man."]})
    assert runner.answer_text(tasks.get_task("chair"), chair) == "A dog and a man."
    processed = [{"exact_match": x} for x in (1.0, 0.0, 1.0, 1.0)]
    assert runner.stderr_of("exact_match", 0.75, processed) == pytest.approx(
        np.std([1, 0, 1, 1], ddof=1) / 2)
    assert runner.stderr_of("exact_match", 0.5, processed) == "N/A"  # not their mean
    assert runner.stderr_of("coco_CIDEr", 0.9, processed) == "N/A"


def test_images_given_as_bytes_read_like_files(loaded, pictures):
    _, _, _, image_cfg = loaded
    with open(pictures[1], "rb") as f:
        data = f.read()
    from_bytes = batching.load_pixels(batching.Conversation([], [data], "b"), image_cfg)
    from_path = batching.load_pixels(batching.Conversation([], [pictures[1]], "p"), image_cfg)
    np.testing.assert_array_equal(from_bytes[0], from_path[0])
    with pytest.raises(batching.ImageLoadError, match=r"sample 'x': cannot read image <9 bytes"):
        batching.load_pixels(batching.Conversation([], [b"not a png"], "x"), image_cfg)


def test_mesh_decoding_gives_the_one_device_answers(ckpt, loaded, pope_file, tmp_path,  # noqa: F811
                                                    monkeypatch):
    d, _ = ckpt
    model, params, tok, image_cfg = loaded
    answers = {}
    for mesh_arg in (None, "data=-1,tensor=2"):
        options = _options(d, pope_file, tmp_path / str(mesh_arg), batch_size=4, mesh=mesh_arg)
        mesh = runner.parse_mesh(options.mesh)
        placed = params if mesh is None else place_on_mesh(model, params, mesh, None, None)[0]
        _, results, records = _run(options, (model, placed, tok, image_cfg, mesh), monkeypatch)
        answers[mesh_arg] = [r["filtered_resps"] for r in records]
    assert dict(runner.parse_mesh("data=-1,tensor=2").shape) == {"data": 4, "fsdp": 1,
                                                                  "tensor": 2}
    assert answers["data=-1,tensor=2"] == answers[None]
    with pytest.raises(ValueError, match="expected AXIS=SIZE"):
        runner.parse_mesh("model=2")


def test_tfds_copy_scores_like_the_original_files(ckpt, loaded, pope_file, tmp_path,  # noqa: F811
                                                  monkeypatch, capsys):
    """`--copy-to` stores the samples with their images' bytes; evaluating the copy (the
    original images gone) gives the same prompts, answers and scores."""
    import shutil
    from mllm_jax.eval import tfds_copy
    d, _ = ckpt
    root = tmp_path / "bench"
    shutil.copytree(os.path.dirname(pope_file), root)
    data = str(root / os.path.basename(pope_file))
    assert main(["eval", "--task", "pope", "--data", data, "--copy-to",
                 str(tmp_path / "copy")]) == 0
    copy_dir = re.search(r"copied to (\S+)", capsys.readouterr().out).group(1)
    assert tfds_copy.is_copy(copy_dir)
    task = tasks.get_task("pope")
    original = task.load(data)
    copied = tfds_copy.read_copy(task, copy_dir)
    assert len(copied) == len(original) == 4
    for a, b in zip(original, copied):
        assert (a.doc_id, a.sample_id, a.question, a.target, a.meta) == \
            (b.doc_id, b.sample_id, b.question, b.target, b.meta)
        assert [open(p, "rb").read() for p in a.images] == b.images
    _, want, want_records = _run(_options(d, data, tmp_path / "a"), loaded, monkeypatch)
    shutil.rmtree(root)  # the copy must not need the original files
    _, got, got_records = _run(_options(d, copy_dir, tmp_path / "b"), loaded, monkeypatch)
    assert got["results"] == want["results"]
    assert [r["resps"] for r in got_records] == [r["resps"] for r in want_records]
    with pytest.raises(ValueError, match="copy of task 'pope'"):
        tfds_copy.read_copy(tasks.get_task("gqa"), copy_dir)
