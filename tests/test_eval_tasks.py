"""Benchmark tasks on tiny copies of each published format: loading, prompts,
per-sample scoring and aggregates with hand-computed values, error messages."""

import dataclasses
import json
import os

import pytest
from PIL import Image

from mllm_jax.eval import tasks
from mllm_jax.eval.tasks import get_task

SHORT = "\nAnswer the question using a single word or phrase."


# ----------------------------------------------------------------------------- fixture helpers
def png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return str(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def write_lines(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run(task, samples, responses):
    assert len(samples) == len(responses)
    processed = [task.process_result(s, r) for s, r in zip(samples, responses)]
    json.dumps(processed)  # per-sample results are logged as JSON
    json.dumps([dataclasses.asdict(s) for s in samples])
    return task.aggregate(processed, samples)


def approx(d):
    return {k: pytest.approx(v) for k, v in d.items()}


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_defaults():
    assert sorted(tasks.TASKS) == ["chair", "coco_caption", "gqa", "mme", "pope",
                                   "scienceqa", "vqav2"]
    assert get_task("vqav2").prompt_suffix == SHORT
    assert get_task("gqa").prompt_suffix == SHORT
    assert get_task("scienceqa").prompt_suffix == (
        "\nAnswer with the option's letter from the given choices directly.")
    assert get_task("chair").max_new_tokens == 512
    assert get_task("coco_caption").max_new_tokens == 128
    assert get_task("pope").max_new_tokens == 16
    assert not get_task("chair").answer_from_end and get_task("mme").answer_from_end
    with pytest.raises(ValueError, match="unknown eval task 'popee'.*gqa.*pope"):
        get_task("popee")


# ----------------------------------------------------------------------------- POPE
@pytest.fixture
def pope_dir(tmp_path):
    img = tmp_path / "val2014"
    for i in (1, 2, 3):
        png(str(img / f"COCO_val2014_{i:012d}.jpg"))
    d = tmp_path / "pope"
    write_lines(str(d / "coco_pope_adversarial.json"), [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
         "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000002.jpg",
         "text": "Is there a cat in the image?" + SHORT, "label": "no"},
        {"question_id": 3, "image": "COCO_val2014_000000000003.jpg",
         "text": "Is there a car in the image?", "label": "no"},
    ])
    write_lines(str(d / "coco_pope_random.json"), [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
         "text": "Is there a person in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000003.jpg",
         "text": "Is there a bus in the image?", "label": "no"},
    ])
    return str(d), str(img)


def test_pope_load_and_scores(pope_dir):
    data, root = pope_dir
    task = get_task("pope")
    samples = task.load(data, image_root=root)
    assert [s.doc_id for s in samples] == [0, 1, 2, 3, 4]
    assert [s.meta["split"] for s in samples] == ["adversarial"] * 3 + ["random"] * 2
    s = samples[1]
    assert (s.sample_id, s.question, s.target) == ("2", "Is there a cat in the image?", "no")
    assert s.images == [os.path.join(root, "COCO_val2014_000000000002.jpg")]
    # adversarial: TP, TN, FP ("Not sure": LLaVA's parser only knows No/not/no)
    # random: FN ("There is no person"), FP
    responses = ["Yes, there is a dog.", "No.", "Not sure", "There is no person.", "Yes"]
    out = run(task, samples, responses)
    # overall tp=1 fp=2 tn=1 fn=1
    assert out["pope_accuracy"] == pytest.approx(2 / 5)
    assert out["pope_precision"] == pytest.approx(1 / 3)
    assert out["pope_recall"] == pytest.approx(1 / 2)
    assert out["pope_f1_score"] == pytest.approx(2 / 5)
    assert out["pope_yes_ratio"] == pytest.approx(3 / 5)
    # adversarial tp=1 tn=1 fp=1
    assert out["pope_adversarial_accuracy"] == pytest.approx(2 / 3)
    assert out["pope_adversarial_precision"] == pytest.approx(1 / 2)
    assert out["pope_adversarial_recall"] == pytest.approx(1.0)
    assert out["pope_adversarial_f1_score"] == pytest.approx(2 / 3)
    # random fn=1 fp=1
    assert out["pope_random_accuracy"] == 0.0 and out["pope_random_f1_score"] == 0.0
    assert out["pope_random_yes_ratio"] == pytest.approx(1 / 2)


def test_pope_single_file_limit_and_errors(pope_dir, tmp_path):
    data, root = pope_dir
    task = get_task("pope")
    one = task.load(os.path.join(data, "coco_pope_random.json"), image_root=root)
    assert [s.meta["split"] for s in one] == ["random", "random"]
    first = task.load(data, image_root=root, limit=2)
    assert [s.question for s in first] == [s.question for s in task.load(data, root)[:2]]
    assert task.load(data, image_root=root, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        task.load(data, image_root=root, limit=-1)

    bad = write_lines(str(tmp_path / "bad" / "coco_pope_popular.json"), [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Q?", "label": "yes"},
        "{not json",
    ])
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json:2: not a JSON object"):
        task.load(bad, image_root=root)
    nolabel = write_lines(str(tmp_path / "nolabel" / "coco_pope_popular.json"), [
        {"question_id": 7, "image": "COCO_val2014_000000000001.jpg", "text": "Q?"}])
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json:1: missing 'label'"):
        task.load(nolabel, image_root=root)
    with pytest.raises(ValueError,
                       match=r"coco_pope_random\.json:1: image .*000000000001\.jpg not found"):
        task.load(os.path.join(data, "coco_pope_random.json"), image_root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no such POPE"):
        task.load(str(tmp_path / "missing"), image_root=root)


# ----------------------------------------------------------------------------- VQAv2
def vqav2_files(tmp_path, with_annotations=True):
    root = tmp_path / "val2014"
    for i in (9, 42):
        png(str(root / f"COCO_val2014_{i:012d}.jpg"))
    d = tmp_path / "vqav2"
    q = write_json(str(d / "v2_OpenEnded_mscoco_val2014_questions.json"), {
        "data_subtype": "val2014", "task_type": "Open-Ended", "questions": [
            {"image_id": 9, "question": "How many dogs?", "question_id": 90},
            {"image_id": 42, "question": "What animal is this?", "question_id": 420},
        ]})
    if with_annotations:
        def ans(xs):
            return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(xs)]
        write_json(str(d / "v2_mscoco_val2014_annotations.json"), {"annotations": [
            {"question_id": 420, "image_id": 42, "answer_type": "other",
             "question_type": "what animal is", "answers": ans(["dog"] * 3 + ["cat"] * 7)},
            {"question_id": 90, "image_id": 9, "answer_type": "number",
             "question_type": "how many", "answers": ans(["2"] * 10)},
        ]})
    return q, str(d), str(root)


def test_vqav2_official_format(tmp_path):
    qfile, d, root = vqav2_files(tmp_path)
    task = get_task("vqav2")
    samples = task.load(d, image_root=root)
    assert samples == task.load(qfile, image_root=root)
    assert [s.sample_id for s in samples] == ["90", "420"]
    assert samples[1].images == [os.path.join(root, "COCO_val2014_000000000042.jpg")]
    assert samples[1].target == ["dog"] * 3 + ["cat"] * 7
    assert samples[0].question == "How many dogs?"
    # "Two" -> "2": 10/10 match -> 1; "dog" matches 3 of 10 -> (7 * 1 + 3 * 2/3) / 10 = 0.9
    out = run(task, samples, ["Two", "dog"])
    assert out == approx({"n": 2, "exact_match": 0.95, "exact_match_number": 1.0,
                          "exact_match_other": 0.9})


def test_vqav2_llava_jsonl_and_errors(tmp_path):
    qfile, d, root = vqav2_files(tmp_path, with_annotations=False)
    task = get_task("vqav2")
    with pytest.raises(ValueError, match=r"v2_mscoco_val2014_annotations\.json not found"):
        task.load(qfile, image_root=root)
    jl = write_lines(str(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl"), [
        {"question_id": 5, "image": "COCO_val2014_000000000009.jpg",
         "text": "What color is it?" + SHORT, "category": "default"}])
    samples = task.load(jl, image_root=root)
    assert (samples[0].question, samples[0].target) == ("What color is it?", None)
    assert run(task, samples, ["red"]) == {"n": 1.0}
    write_json(os.path.join(d, "v2_mscoco_val2014_annotations.json"), {"annotations": [
        {"question_id": 90, "answers": [{"answer": "2"}]}]})
    with pytest.raises(ValueError, match=r"questions\[1\]: question_id 420 has no annotation"):
        task.load(qfile, image_root=root)
    write_json(os.path.join(d, "v2_mscoco_val2014_annotations.json"), {"annotations": [
        {"question_id": 90, "answers": [{"answer": "2"}]},
        {"question_id": 420, "answers": [{"answer": "dog"}]}]})
    assert len(task.load(qfile, image_root=root)) == 2
    os.remove(os.path.join(root, "COCO_val2014_000000000042.jpg"))
    assert len(task.load(qfile, image_root=root, limit=1)) == 1  # only loaded samples are checked
    with pytest.raises(ValueError, match=r"question_id 420\).*000000000042\.jpg not found"):
        task.load(qfile, image_root=root)


# ----------------------------------------------------------------------------- GQA
def test_gqa(tmp_path):
    root = tmp_path / "images"
    png(str(root / "n100.jpg"))
    png(str(root / "n200.jpg"))
    path = write_json(str(tmp_path / "testdev_balanced_questions.json"), {
        "201": {"imageId": "n100", "question": "Is the car red?", "answer": "yes",
                "fullAnswer": "Yes, the car is red.", "isBalanced": True,
                "types": {"structural": "verify", "semantic": "attr"}},
        "202": {"imageId": "n200", "question": "What is on the floor?", "answer": "table",
                "isBalanced": True},
    })
    task = get_task("gqa")
    samples = task.load(str(tmp_path), image_root=str(root))
    assert samples == task.load(path, image_root=str(root))
    assert [(s.sample_id, s.target) for s in samples] == [("201", "yes"), ("202", "table")]
    assert samples[0].images == [os.path.join(str(root), "n100.jpg")]
    assert samples[0].meta["structural"] == "verify"
    # LLaVA: rstrip('.') then lower; no article removal, so "The table" is wrong
    out = run(task, samples, ["Yes.", "The table"])
    assert out == {"exact_match": 0.5}
    assert run(task, samples, [" yes\n", "Table."]) == {"exact_match": 1.0}
    assert task.load(path, image_root=str(root), limit=1)[0].sample_id == "201"
    os.remove(os.path.join(str(root), "n200.jpg"))
    with pytest.raises(ValueError, match=r"question 202: image .*n200\.jpg not found"):
        task.load(path, image_root=str(root))
    broken = write_json(str(tmp_path / "b" / "q.json"), {"7": {"imageId": "n100", "question": "Q"}})
    with pytest.raises(ValueError, match=r"q\.json: question 7: missing 'answer'"):
        task.load(broken, image_root=str(root))


# ----------------------------------------------------------------------------- MME
def mme_release(tmp_path):
    d = tmp_path / "MME_Benchmark_release_version"
    # side-by-side layout
    png(str(d / "existence" / "000000001.jpg"))
    png(str(d / "existence" / "000000002.jpg"))
    write_lines(str(d / "existence" / "000000001.txt"), [
        "Is there a dog in this image? Please answer yes or no.\tYes",
        "Is there a cat in this image? Please answer yes or no.\tNo"])
    write_lines(str(d / "existence" / "000000002.txt"), [
        "Is there a bus in this image? Please answer yes or no.\tYes",
        "Is there a car in this image? Please answer yes or no.\tNo"])
    # images/ + questions_answers_YN/ layout
    png(str(d / "artwork" / "images" / "14777.jpg"))
    write_lines(str(d / "artwork" / "questions_answers_YN" / "14777.txt"), [
        "Is this artwork titled sorrow? Please answer yes or no.\tNo",
        "Does this artwork belong to the type of religious?  Please answer yes or no.\tYes"])
    png(str(d / "code_reasoning" / "0020.png"))
    write_lines(str(d / "code_reasoning" / "0020.txt"), [
        "Is a python code shown in the picture? Please answer yes or no.\tYes",
        "Is a c++ code shown in the picture? Please answer yes or no.\tNo"])
    return str(d)


def test_mme(tmp_path):
    d = mme_release(tmp_path)
    task = get_task("mme")
    samples = task.load(d)
    # perception subtasks first (MME order), then cognition
    assert [s.meta["subtask"] for s in samples] == ["existence"] * 4 + ["artwork"] * 2 + [
        "code_reasoning"] * 2
    assert samples[0].question == "Is there a dog in this image?"
    assert samples[5].question == "Does this artwork belong to the type of religious?"
    assert samples[0].target == "yes" and samples[1].target == "no"
    assert samples[0].sample_id == "existence/000000001.jpg"
    assert samples[4].sample_id == "artwork/images/14777.jpg"
    assert samples[4].images == [os.path.join(d, "artwork", "images", "14777.jpg")]
    assert samples[6].images == [os.path.join(d, "code_reasoning", "0020.png")]
    responses = [
        "Yes", "No", "Yes", "Yes",        # existence: image 1 2/2, image 2 1/2
        "no", "Yes, it is.",             # artwork: 2/2
        "Yes", "I cannot tell",          # code: 1/2 ("other" is always wrong)
    ]
    out = run(task, samples, responses)
    # existence: acc 75 + acc+ 50; artwork 100 + 100; code_reasoning 50 + 0
    assert out == approx({"mme_perception_score": 325.0, "mme_cognition_score": 50.0,
                          "mme_existence_score": 125.0, "mme_artwork_score": 200.0,
                          "mme_code_reasoning_score": 50.0})
    assert [s.doc_id for s in task.load(d, limit=3)] == [0, 1, 2]


def test_mme_errors(tmp_path):
    d = mme_release(tmp_path)
    task = get_task("mme")
    write_lines(os.path.join(d, "existence", "000000002.txt"), ["Is there a bus?\tMaybe"])
    with pytest.raises(ValueError, match=r"existence/000000002\.txt:1: answer must be Yes/No"):
        task.load(d)
    write_lines(os.path.join(d, "existence", "000000002.txt"), ["just one field"])
    with pytest.raises(ValueError, match=r"000000002\.txt:1: expected 'question<TAB>answer'"):
        task.load(d)
    write_lines(os.path.join(d, "existence", "000000003.txt"), ["Q?\tYes"])
    os.remove(os.path.join(d, "existence", "000000002.txt"))
    with pytest.raises(ValueError, match=r"000000003\.txt:1: no image named 000000003"):
        task.load(d)
    with pytest.raises(ValueError, match="no MME subtask folders"):
        task.load(str(tmp_path))


# ----------------------------------------------------------------------------- ScienceQA
PROBLEMS = {
    "1": {"question": "Which animal is bigger?", "choices": ["ant", "whale"], "answer": 1,
          "hint": "", "image": "image.png", "subject": "natural science", "lecture": "",
          "solution": ""},
    "2": {"question": "Which word rhymes with cat?", "choices": ["hat", "dog", "sun"],
          "answer": 0, "hint": "Read  the words.", "image": None, "subject": "language science",
          "lecture": "", "solution": ""},
    "3": {"question": "Train only?", "choices": ["a", "b"], "answer": 0, "hint": "",
          "image": None, "subject": "social science", "lecture": "", "solution": ""},
}
TEXT_1 = "Context: N/A\nQuestion: Which animal is bigger?\nOptions: (A) ant (B) whale"
TEXT_2 = ("Context: Read the words.\nQuestion: Which word rhymes with cat?\n"
          "Options: (A) hat (B) dog (C) sun")


def scienceqa_files(tmp_path):
    d = tmp_path / "scienceqa"
    write_json(str(d / "problems.json"), PROBLEMS)
    write_json(str(d / "pid_splits.json"), {"train": ["3"], "test": ["1", "2"]})
    # LLaVA's convert_sqa_to_llava output for the same test problems (CQM-A)
    write_json(str(d / "llava_test_CQM-A.json"), [
        {"id": "1", "image": "1/image.png", "conversations": [
            {"from": "human", "value": TEXT_1 + "\n<image>"},
            {"from": "gpt", "value": "The answer is B."}]},
        {"id": "2", "conversations": [
            {"from": "human", "value": TEXT_2},
            {"from": "gpt", "value": "The answer is A."}]},
    ])
    root = d / "images" / "test"
    png(str(root / "1" / "image.png"))
    return str(d), str(root)


def test_scienceqa_both_formats(tmp_path):
    d, root = scienceqa_files(tmp_path)
    task = get_task("scienceqa")
    orig = task.load(os.path.join(d, "problems.json"), image_root=root)
    llava = task.load(os.path.join(d, "llava_test_CQM-A.json"), image_root=root)
    assert task.load(d, image_root=root) == orig
    for samples in (orig, llava):
        assert [s.sample_id for s in samples] == ["1", "2"]
        assert [s.question for s in samples] == [TEXT_1, TEXT_2]
        assert [s.target for s in samples] == [1, 0]
        assert [s.meta["num_options"] for s in samples] == [2, 3]
        assert samples[0].images == [os.path.join(root, "1", "image.png")]
        assert samples[1].images == []
    assert orig[1].meta["options"] == ["hat", "dog", "sun"]
    # "B" right; "The answer is C." parsed to C (wrong); image subset = problem 1 only
    for samples in (orig, llava):
        out = run(task, samples, ["B", "The answer is C."])
        assert out == {"exact_match": 0.5, "exact_match_img": 1.0}
    # LLaVA's parser: "C" is not among the 2 options of problem 1 -> invalid -> wrong;
    # "A. hat" is letter + ". "
    assert run(task, orig, ["C", "A. hat"]) == {"exact_match": 0.5, "exact_match_img": 0.0}


def test_scienceqa_errors(tmp_path):
    d, root = scienceqa_files(tmp_path)
    task = get_task("scienceqa")
    bad = write_json(str(tmp_path / "bad" / "llava_test_CQM-A.json"), [
        {"id": "9", "conversations": [{"from": "human", "value": TEXT_2},
                                      {"from": "gpt", "value": "A"}]}])
    with pytest.raises(ValueError, match=r"entry 0 \(id 9\): expected an 'Options: \(A\)"):
        task.load(bad, image_root=root)
    os.remove(os.path.join(root, "1", "image.png"))
    with pytest.raises(ValueError, match=r"problem 1: image .*1/image\.png not found"):
        task.load(d, image_root=root)
    os.remove(os.path.join(d, "pid_splits.json"))
    with pytest.raises(ValueError, match=r"pid_splits\.json: file not found"):
        task.load(d, image_root=root)


# ----------------------------------------------------------------------------- chain of thought
def test_extract_answer():
    vqa = get_task("vqav2")
    assert vqa.extract_answer("The dog is brown and small.\nAnswer: brown") == "brown"
    assert vqa.extract_answer("answer: maybe a cat... Final ANSWER:  two ") == "two"
    assert vqa.extract_answer("**Answer:** yes") == "yes"
    assert vqa.extract_answer("brown") == "brown"
    assert get_task("pope").extract_answer("I see a dog. Answer: No") == "No"
    sqa = get_task("scienceqa")
    assert sqa.extract_answer("Whales are mammals. The answer is B.") == "B"
    assert sqa.extract_answer("Reasoning...\nAnswer: The answer is (C).") == "C"
    assert sqa.extract_answer("Reasoning...\nAnswer: A. ant") == "A. ant"
    cap = get_task("coco_caption")
    assert cap.extract_answer("Answer: a dog on grass.") == "Answer: a dog on grass."
    assert get_task("chair").extract_answer("x answer: y") == "x answer: y"
    # extracted answers feed the ordinary scorers
    s = tasks.Sample(0, "1", [], "Q", 1, {"num_options": 2})
    answer = sqa.extract_answer("... so the answer is B.")
    assert sqa.process_result(s, answer)["exact_match"] == 1.0


# ----------------------------------------------------------------------------- COCO captions
def coco_files(tmp_path):
    d = tmp_path / "annotations"
    root = tmp_path / "val2014"
    png(str(root / "COCO_val2014_000000000011.jpg"))
    png(str(root / "COCO_val2014_000000000022.jpg"))
    images = [{"id": 11, "file_name": "COCO_val2014_000000000011.jpg"},
              {"id": 22, "file_name": "COCO_val2014_000000000022.jpg"}]
    write_json(str(d / "captions_val2014.json"), {"images": images, "annotations": [
        {"image_id": 11, "id": 1, "caption": "A dog sitting on a couch."},
        {"image_id": 22, "id": 2, "caption": "two cars parked near street"},
        {"image_id": 11, "id": 3, "caption": "A dog sitting on a couch."},
        {"image_id": 22, "id": 4, "caption": "Two cars parked near street."},
    ]})
    write_json(str(d / "instances_val2014.json"), {
        "images": images,
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"},
                       {"id": 18, "name": "dog"}],
        "annotations": [{"image_id": 11, "category_id": 18, "id": 100},
                        {"image_id": 22, "category_id": 1, "id": 101},
                        {"image_id": 22, "category_id": 1, "id": 102}],
    })
    return str(d), str(root)


def test_coco_caption(tmp_path):
    d, root = coco_files(tmp_path)
    task = get_task("coco_caption")
    samples = task.load(d, image_root=root)
    assert [s.sample_id for s in samples] == ["11", "22"]
    assert samples[0].target == ["A dog sitting on a couch."] * 2
    assert samples[0].question == "" and task.prompt_suffix
    assert samples[1].images == [os.path.join(root, "COCO_val2014_000000000022.jpg")]
    # identical captions with no n-gram shared across the two images: every tf-idf
    # cosine is 1 -> CIDEr-D 10 per image; BLEU 1
    out = run(task, samples, ["A dog sitting on a couch.", "Two cars parked near street"])
    assert out["coco_CIDEr"] == pytest.approx(10.0)
    assert out["coco_Bleu_4"] == pytest.approx(1.0)
    # second caption shares nothing: CIDEr (10 + 0) / 2; BLEU-1 = 6 of 11 words
    out = run(task, samples, ["a dog sitting on a couch", "purple elephants fly slowly away"])
    assert out["coco_CIDEr"] == pytest.approx(5.0)
    assert out["coco_Bleu_1"] == pytest.approx(6 / 11)


def test_coco_caption_karpathy(tmp_path):
    root = tmp_path / "coco"
    png(str(root / "val2014" / "COCO_val2014_000000000022.jpg"))
    path = write_json(str(tmp_path / "dataset_coco.json"), {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": "COCO_train2014_000000000011.jpg", "imgid": 0,
         "split": "train", "cocoid": 11, "sentences": [{"raw": "x", "tokens": ["x"]}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000022.jpg", "imgid": 1,
         "split": "test", "cocoid": 22,
         "sentences": [{"raw": "Two cars.", "tokens": ["two", "cars"]},
                       {"raw": "Cars parked.", "tokens": ["cars", "parked"]}]},
    ]})
    samples = get_task("coco_caption").load(path, image_root=str(root))
    assert len(samples) == 1
    s = samples[0]
    assert (s.sample_id, s.meta) == ("22", {"image_id": 22})
    assert s.target == ["Two cars.", "Cars parked."]
    assert s.images == [os.path.join(str(root), "val2014", "COCO_val2014_000000000022.jpg")]


# ----------------------------------------------------------------------------- CHAIR
def test_chair(tmp_path):
    d, root = coco_files(tmp_path)
    task = get_task("chair")
    samples = task.load(d, image_root=root)
    assert samples == task.load(os.path.join(d, "captions_val2014.json"), image_root=root)
    assert task.prompt_suffix == "Please describe this image in detail."
    # ground truth = segmentation labels + objects named in the reference captions
    assert samples[0].target == ["couch", "dog"]
    assert samples[1].target == ["car", "person"]
    assert samples[1].meta["captions"] == ["two cars parked near street",
                                           "Two cars parked near street."]
    assert task.target_text(samples[0]) == "A dog sitting on a couch."
    responses = ["A dog and a cat on a couch.", "A man standing."]
    out = run(task, samples, responses)
    # mentions: dog, cat, couch | person -> 1 hallucinated (cat) of 4 mentions,
    # 1 of 2 captions; recall (2 + 1) / (2 + 2); lengths 8 and 3 words
    assert out == approx({"coco_cap_chair_s": 50.0, "coco_cap_chair_i": 25.0,
                          "coco_cap_recall": 75.0, "coco_cap_avg_len": 5.5})
    per = task.process_result(samples[0], responses[0])["chair"]
    assert per["hallucinated"] == ["cat"]


def test_chair_errors(tmp_path):
    d, root = coco_files(tmp_path)
    task = get_task("chair")
    os.remove(os.path.join(d, "instances_val2014.json"))
    with pytest.raises(ValueError, match=r"instances_val2014\.json: file not found"):
        task.load(os.path.join(d, "captions_val2014.json"), image_root=root)
    with pytest.raises(ValueError, match="expected a COCO instances"):
        task.load(write_json(os.path.join(d, "other.json"), {}), image_root=root)
    with pytest.raises(ValueError, match="no such COCO annotation file"):
        task.load(os.path.join(d, "nowhere"), image_root=root)
    d, root = coco_files(tmp_path / "again")
    with open(os.path.join(d, "captions_val2014.json"), "w") as f:
        f.write('{"images": [')
    with pytest.raises(ValueError, match=r"captions_val2014\.json: not valid JSON"):
        task.load(d, image_root=root)
