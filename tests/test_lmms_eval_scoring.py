"""`--scoring lmms_eval`: every task's per-sample scores and aggregates equal lmms-eval
0.7.3's on hand-made answers.

The expected values were produced by running lmms-eval 0.7.3's own functions (named at
each case) on the same answers; generated answers went through the strip that
`ConfigurableTask.process_results` applies first.
"""
import json

import pytest

from mllm_jax.eval import lmms_eval_scoring, runner
from mllm_jax.eval.tasks import SCORINGS, Sample, get_task


def score(name, rows, responses):
    """(per-sample results, aggregate) of task `name` on `rows` (target, meta) with
    lmms-eval scoring."""
    task = get_task(name)
    samples = [Sample(i, str(i), [], f"question {i}", target, meta)
               for i, (target, meta) in enumerate(rows)]
    processed = [task.process_result(s, r, "lmms_eval") for s, r in zip(samples, responses)]
    json.dumps(processed)  # logged per sample
    return processed, task.aggregate(processed, samples, "lmms_eval")


def approx(d):
    return {k: pytest.approx(v, rel=1e-12, abs=1e-15) for k, v in d.items()}


# ----------------------------------------------------------------------------- POPE
POPE = [("Yes", "yes", "random"), ("yes", "yes", "random"), (" yes", "no", "random"),
        ("Yes.", "yes", "random"), ("Yes, there is", "yes", "random"), ("no", "no", "random"),
        ("No.", "no", "adversarial"), ("NO", "no", "adversarial"),
        ("Not sure", "yes", "adversarial"), ("", "yes", "adversarial"),
        ("yes", "no", "adversarial"), ("no", "yes", "adversarial")]


def test_pope_accepts_only_exact_yes_no_and_its_yes_ratio_counts_labels():
    processed, out = score("pope", [(gt, {"split": s}) for _, gt, s in POPE],
                           [r for r, _, _ in POPE])
    # pope_process_results
    assert [p["pope"]["score"] for p in processed] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0,
                                                       0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # pope_aggregate_{accuracy,precision,recall,f1_score,yes_ratio} over all questions
    # (lmms-eval's "pope") and per split (its "pope_random", "pope_adv"); lmms-eval's
    # pope_yes_ratio is reported as yes_ratio_of_labels.
    expected = {
        "pope_accuracy": 0.3333333333333333, "pope_precision": 0.5,
        "pope_recall": 0.6666666666666666, "pope_f1_score": 0.5714285714285715,
        "pope_yes_ratio_of_labels": 0.5833333333333334,
        "pope_random_accuracy": 0.5, "pope_random_precision": 0.6666666666666666,
        "pope_random_recall": 1.0, "pope_random_f1_score": 0.8,
        "pope_random_yes_ratio_of_labels": 0.6666666666666666,
        "pope_adversarial_accuracy": 0.16666666666666666, "pope_adversarial_precision": 0.0,
        "pope_adversarial_recall": 0.0, "pope_adversarial_f1_score": 0,
        "pope_adversarial_yes_ratio_of_labels": 0.5}
    assert out == approx(expected)
    assert "pope_yes_ratio" not in out  # the name would read as the answers' yes share
    official = get_task("pope").process_result(Sample(0, "0", [], "q", "yes", {"split": "x"}),
                                               "Yes, there is")
    assert official["pope"]["prediction"] == "yes"  # POPE's own parser takes it


# ----------------------------------------------------------------------------- GQA
GQA = [("Yes.", "yes"), ("yes .", "yes"), ("Left", "left"), ("the left", "left"), ("2", "two"),
       ("Two", "two"), ("T-shirt", "t-shirt"), ("tshirt", "t-shirt"), ("  Red!  ", "red"),
       ("red car", "red"), ("it's", "its"), ("No", "no")]


def test_gqa_ignores_case_and_every_punctuation_character():
    processed, out = score("gqa", [(gt, {}) for _, gt in GQA], [r for r, _ in GQA])
    # exact_match_hf_evaluate(ignore_case=True, ignore_punctuation=True) per answer, mean
    assert [p["exact_match"] for p in processed] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0,
                                                     1.0, 0.0, 1.0, 1.0]
    assert out == approx({"exact_match": 0.6666666666666666})
    assert processed[6]["prediction"] == "tshirt"


# ----------------------------------------------------------------------------- ScienceQA
SQA = [("A", 0), ("a", 0), ("A.", 0), ("A. dog", 0), ("A.dog", 0), ("(A)", 0),
       ("The answer is A.", 0), ("B", 0), ("b.", 1), ("a. dog", 0), (" C ", 2), ("C) cat", 2),
       ("B. Paris", 1), ("D.", 2)]


def test_scienceqa_takes_the_letter_in_any_case_or_an_upper_case_letter_and_period():
    rows = [(a, {"num_options": 4, "has_image": i < 6}) for i, (_, a) in enumerate(SQA)]
    processed, out = score("scienceqa", rows, [r for r, _ in SQA])
    # sqa_process_results
    assert [p["exact_match"] for p in processed] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
                                                     0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # mean over all problems ("scienceqa") and over those with an image ("scienceqa_img")
    assert out == approx({"exact_match": 0.5, "exact_match_img": 0.8333333333333334})


# ----------------------------------------------------------------------------- MME
MME = [("existence", "e/1.png", "Yes", "yes"), ("existence", "e/1.png", "no.", "no"),
       ("existence", "e/2.png", "Y", "yes"), ("existence", "e/2.png", "N.", "yes"),
       ("count", "c/1.png", "Yes, there is", "yes"), ("count", "c/1.png", " no", "no"),
       ("count", "c/2.png", "Not sure", "no"), ("count", "c/2.png", "maybe", "no"),
       ("code_reasoning", "k/1.png", "n", "no"), ("code_reasoning", "k/1.png", "yes", "yes"),
       ("code_reasoning", "k/2.png", "No, it is not", "yes"),
       ("code_reasoning", "k/2.png", "yess", "yes")]


def test_mme_parser_takes_y_and_n_and_scores_pairs():
    rows = [(gt, {"subtask": sub, "image_id": image}) for sub, image, _, gt in MME]
    processed, out = score("mme", rows, [r for _, _, r, _ in MME])
    # mme_process_results
    assert [p["mme"]["score"] for p in processed] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0,
                                                      1.0, 1.0, 0.0, 1.0]
    # mme_aggregate_results over the perception and the cognition results
    assert out["mme_perception_score"] == pytest.approx(250.0)
    assert out["mme_cognition_score"] == pytest.approx(125.0)
    assert out["mme_existence_score"] == pytest.approx(125.0)  # the category lmms-eval logs
    with pytest.raises(ValueError, match="two of each image"):
        score("mme", rows[:3], [r for _, _, r, _ in MME[:3]])


# ----------------------------------------------------------------------------- VQAv2
VQA = [("Two", ["2"] * 4 + ["two"] * 3 + ["3"] * 3), ("2 dogs.", ["2 dogs"] * 10),
       ("Yes.", ["yes"] * 10), ("a dog", ["dog"] * 2 + ["the dog"] * 2 + ["puppy"] * 6),
       ("dont know", ["don't know"] * 2 + ["no"] * 8), ("1,,2-3", ["123"] * 10),
       ("red", ["red"] * 1 + ["Red"] * 1 + ["maroon"] * 8),
       ("\tNone\n", ["0"] * 5 + ["none"] * 5), ("hot-dog", ["hot dog"] * 5 + ["hotdog"] * 5)]


def test_vqav2_normalizes_every_answer_with_the_evalai_normalizer():
    processed, out = score("vqav2", [(answers, {}) for _, answers in VQA], [r for r, _ in VQA])
    # vqav2_process_results_val (answers with their answer ids, as the dataset has them)
    assert [p["exact_match"] for p in processed] == pytest.approx(
        [1, 1, 1, 1, 0.6, 1, 0.6, 1, 1], rel=1e-12)
    assert out["exact_match"] == pytest.approx(0.911111111111111, rel=1e-12)  # mean
    # the official script's digit-comma pattern misses "1,,2": "1,,2-3" is "1 2 3" there
    official = get_task("vqav2").process_result(Sample(0, "0", [], "q", VQA[5][1], {}),
                                                VQA[5][0])
    assert official["exact_match"] == 0.0 and processed[5]["answer"] == "123"


# ----------------------------------------------------------------------------- CHAIR
# A stand-in for nltk's word_tokenize / pos_tag / WordNet lemmatizer, given to lmms-eval's
# caption_to_words (patched into its module) and to ours alike.
LEMMAS = {("dogs", "n"): "dog", ("men", "n"): "man", ("sitting", "v"): "sit",
          ("buses", "n"): "bus", ("glasses", "n"): "glass", ("riding", "v"): "ride",
          ("bears", "n"): "bear", ("chairs", "n"): "chair", ("toilets", "n"): "toilet"}
TAGS = {"sitting": "VBG", "riding": "VBG", "red": "JJ", "quickly": "RB", "a": "DT", "the": "DT"}
STUB_NLP = lmms_eval_scoring.Nlp(
    word_tokenize=lambda text: text.replace(".", " .").replace(",", " ,").split(),
    pos_tag=lambda words: [(w, TAGS.get(w, "NNS" if w.endswith("s") else "NN")) for w in words],
    lemmatize=lambda word, pos: LEMMAS.get((word, pos), word))
CHAIR = [("A man and two dogs sitting on a red couch.", ["person", "dog", "couch"]),
         ("People riding buses near a toilet seat and wine glasses.",
          ["person", "bus", "toilet"]),
         ("Teddy bears on a hot dog stand with a baby dog, quickly.",
          ["teddy bear", "dog", "hot dog"]),
         ("Nothing here.", ["cat"]),
         ("Men on chairs, a motor bike and a dining table.", ["person", "chair"])]


def test_chair_words_and_aggregates(monkeypatch):
    monkeypatch.setattr(lmms_eval_scoring, "nltk_pipeline", lambda: STUB_NLP)
    get_task("chair").require_scoring("lmms_eval")
    processed, out = score("chair", [(sorted(gt), {}) for _, gt in CHAIR],
                           [c for c, _ in CHAIR])
    # coco_cap_chair_process_result's node words
    assert [p["chair"]["mentioned"] for p in processed] == [
        ["person", "dog", "couch"], ["person", "bus", "toilet", "wine glass"],
        ["teddy bear", "hot dog", "dog"], [], ["person", "chair", "dining table"]]
    # coco_cap_chair_aggregate_results_{chair_i,chair_s,recall}
    assert out == approx({"coco_cap_chair_i": 15.384615384615385, "coco_cap_chair_s": 40.0,
                          "coco_cap_recall": 91.66666666666666})


def test_chair_without_nltk_says_what_to_install(monkeypatch):
    def missing():
        raise RuntimeError("install it (pip install nltk) and its data (python -m "
                           "nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet)")

    monkeypatch.setattr(lmms_eval_scoring, "nltk_pipeline", missing)
    with pytest.raises(ValueError, match="--scoring lmms_eval on chair: .*pip install nltk"
                                         ".*wordnet"):
        get_task("chair").require_scoring("lmms_eval")
    get_task("chair").require_scoring("official")


# ----------------------------------------------------------------------------- COCO captions
COCO = [("A dog sitting on a couch.", ["A dog sits on the couch.", "A brown dog on a sofa",
                                       "dog resting on couch"]),
        ("Two cars parked near the street", ["Two cars parked on a street.",
                                             "Cars parked by the road."]),
        ("A man riding a wave on top of a surfboard.",
         ["A surfer rides a large wave.", "A man on a surfboard riding a wave.",
          "Someone surfing in the ocean"])]


def test_coco_caption_scores_of_pycocoevalcap_with_rouge_l():
    rows = [(refs, {"image_id": i + 1}) for i, (_, refs) in enumerate(COCO)]
    _, out = score("coco_caption", rows, [c for c, _ in COCO])
    # coco_aggregation_result (pycocoevalcap with its Java PTB tokenizer), per metric
    assert out == approx({"coco_Bleu_1": 0.8181818181446281, "coco_Bleu_2": 0.586939185624637,
                          "coco_Bleu_3": 0.3505086507660945, "coco_Bleu_4": 4.26617059269443e-05,
                          "coco_ROUGE_L": 0.649010485735197, "coco_CIDEr": 1.8948151404032154})


# ----------------------------------------------------------------------------- the option
def test_every_task_scores_both_ways_and_a_bad_scoring_names_the_choices():
    from mllm_jax.eval.tasks import TASKS
    for task in TASKS.values():
        for scoring in SCORINGS:
            assert callable(getattr(task, f"process_result_{scoring}"))
            assert callable(getattr(task, f"aggregate_{scoring}"))
    with pytest.raises(ValueError, match=r"--scoring must be one of official, lmms_eval, "
                                         r"got 'lmms'"):
        get_task("gqa").process_result(Sample(0, "0", [], "q", "a", {}), "a", "lmms")
    with pytest.raises(ValueError, match=r"--scoring must be one of official, lmms_eval, got "
                                         r"'LMMS' \(EvalOptions.scoring\)"):
        runner.EvalOptions(ckpt="ckpt", task="pope", data="pope.json", scoring="LMMS")
    assert runner.EvalOptions(ckpt="ckpt", task="pope", data="p.json").scoring == "official"
