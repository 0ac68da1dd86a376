"""Hand-made cases with known answers for the QA benchmark scorers."""

import math

import pytest

from mllm_jax.eval.mme import mme_scores, parse_pred_ans
from mllm_jax.eval.pope import parse_yes_no, pope_metrics, pope_metrics_by_split
from mllm_jax.eval.scienceqa import INVALID, parse_choice, parse_letter, scienceqa_accuracy
from mllm_jax.eval.vqa import normalize_answer, vqa_accuracy, vqa_score


# ----------------------------------------------------------------------------- VQA
@pytest.mark.parametrize("raw,expected", [
    ("two", "2"),
    ("Two", "2"),
    ("none", "0"),
    ("a dog", "dog"),
    ("The dog", "dog"),
    ("an apple", "apple"),
    ("dog.", "dog"),
    ("dog?", "dog"),
    ("  dog\n", "dog"),
    ("dont", "don't"),       # official map (since 2016) uses ASCII apostrophes
    ("weve", "we've"),
    ("Im", "im"),            # keys with capitals never match (lowercased first)
    ("it's", "it's"),        # ' is not in the punctuation list
    ("10:30", "10:30"),      # neither is :
    ("red-blue", "red blue"),   # - is: no space around it -> replaced by a space
    ("red - blue", "red blue"),
    ("wow!", "wow"),
    ("{x}", "x"),
    ("a.m.", "am"),          # periods not followed by a digit are removed
    ("ten", "10"),
    ("an ox", "ox"),
    ("3.5", "3.5"),           # period between digits kept
    ("1,000", "1000"),        # commaStrip present -> punctuation removed
    ("red,blue", "red blue"),  # no space around comma -> replaced by space
    ("red, blue", "red blue"),  # space after comma -> removed
    ("yes", "yes"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    gts = ["dog"] * 3 + ["cat"] * 7
    # subsets dropping a "dog" (3 of them) have 2 matches -> 2/3; other 7 have 3 -> 1
    assert vqa_accuracy("dog", gts) == pytest.approx((7 * 1 + 3 * (2 / 3)) / 10)
    assert vqa_accuracy("dog", gts) == pytest.approx(0.9)
    assert vqa_accuracy("cat", gts) == pytest.approx(1.0)
    assert vqa_accuracy("horse", gts) == 0.0
    # 1 match: 9 subsets with 1 -> 1/3, 1 subset with 0
    one = ["dog"] + ["cat"] * 9
    assert vqa_accuracy("dog", one) == pytest.approx(9 * (1 / 3) / 10)
    # 2 matches: 8 subsets with 2/3, 2 with 1/3
    two = ["dog"] * 2 + ["cat"] * 8
    assert vqa_accuracy("dog", two) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # >= 4 matches -> 1
    assert vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)


def test_vqa_accuracy_normalizes_prediction():
    gts = ["2"] * 10
    assert vqa_accuracy("Two.", gts) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don’t"] * 10) == 0.0
    # official: when all annotators agree nothing on the GT side is normalized...
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    # ...nor the prediction, unless normalize_prediction (default) did it first
    assert vqa_accuracy("Two", ["2"] * 10, normalize_prediction=False) == 0.0
    assert vqa_accuracy(" 2\n", ["2"] * 10, normalize_prediction=False) == 1.0
    # ...unless full GT normalization is requested
    assert vqa_accuracy("2", ["two"] * 10, gt_normalization="full") == 1.0


def test_vqa_accuracy_official_vs_legacy_flow():
    gts = ["two"] * 8 + ["2"] * 2
    # master vqaEval.py: annotators disagree -> GT digit-normalized too -> 10 matches
    assert vqa_accuracy("2", gts) == 1.0
    # 2016 flow: GT only punctuation-processed -> 2 matches:
    # the 2 "2" subsets see 1 match (1/3), the 8 "two" subsets see 2 (2/3)
    assert vqa_accuracy("2", gts, gt_normalization="legacy") == pytest.approx(
        (2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("Two", ["2"] * 10, gt_normalization="none",
                        normalize_prediction=False) == 0.0
    # master strips the answers first; the 2016 flow compares them as released
    assert vqa_accuracy("dog", [" dog"] * 10) == 1.0
    assert vqa_accuracy("dog", [" dog"] * 10, gt_normalization="legacy") == 0.0
    with pytest.raises(ValueError, match="gt_normalization"):
        vqa_accuracy("2", gts, gt_normalization="bogus")


def test_vqa_score_aggregation():
    preds = {1: "dog", 2: "two", 3: "no"}
    anns = {
        1: {"answers": [{"answer": "dog"}] * 3 + [{"answer": "cat"}] * 7,
            "question_type": "what is", "answer_type": "other"},
        2: {"answers": ["2"] * 10, "question_type": "how many", "answer_type": "number"},
        3: {"answers": ["yes"] * 10, "question_type": "is the", "answer_type": "yes/no"},
    }
    out = vqa_score(preds, anns)
    assert out["count"] == 3
    assert out["overall"] == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    assert out["per_question_type"] == pytest.approx(
        {"what is": 0.9, "how many": 1.0, "is the": 0.0})
    assert out["per_answer_type"]["number"] == pytest.approx(1.0)
    assert out["per_question"][1] == pytest.approx(0.9)
    pct = vqa_score(list(preds.values()), list(anns.values()), percent=True)
    assert pct["overall"] == pytest.approx(100 * (1.9 / 3))


# ----------------------------------------------------------------------------- POPE
@pytest.mark.parametrize("text,expected", [
    ("No, there is not.", "no"),
    ("Yes.", "yes"),
    ("yes", "yes"),
    ("There is no dog.", "no"),
    ("Not sure", "yes"),     # official rule: "Not" (capitalised) is not a no-word
    ("It is not there", "no"),
    ("No", "no"),
    ("Yes. There is no cat.", "yes"),  # only the first sentence counts
    ("no.", "no"),
    ("Yes, there is a dog.", "yes"),
    ("Yes, but no cat.", "no"),        # commas dropped, "no" is in the first sentence
    ("I do not see a dog.", "no"),
    ("NO", "yes"),                     # case-sensitive word list
    ("Nope", "yes"),
    ("no,", "no"),
    ("", "yes"),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_metrics():
    preds = ["Yes", "yes", "No", "Yes.", "There is no dog.", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    m = pope_metrics(preds, labels)
    # TP=2 FN=1 FP=1 TN=2
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_pope_degenerate_no_positive_predictions():
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.0


def test_pope_by_split():
    recs = [
        {"split": "random", "prediction": "Yes", "label": "yes"},
        {"split": "random", "prediction": "No", "label": "no"},
        {"split": "adversarial", "prediction": "Yes", "label": "no"},
        {"split": "adversarial", "prediction": "Yes", "label": "yes"},
    ]
    out = pope_metrics_by_split(recs)
    assert list(out) == ["random", "adversarial", "average"]
    assert out["random"]["accuracy"] == 1.0
    assert out["adversarial"]["accuracy"] == 0.5
    assert out["adversarial"]["precision"] == 0.5
    assert out["average"]["accuracy"] == pytest.approx(0.75)
    assert out["average"]["yes_ratio"] == pytest.approx((0.5 + 1.0) / 2)


# ----------------------------------------------------------------------------- MME
def test_mme_parse():
    assert parse_pred_ans("Yes") == "yes"
    assert parse_pred_ans("No, it is not.") == "no"
    assert parse_pred_ans("yes, there is") == "yes"
    assert parse_pred_ans("There is a dog") == "other"
    assert parse_pred_ans("No.") == "no"
    assert parse_pred_ans("Not sure") == "no"        # "not " holds "no"
    assert parse_pred_ans("None") == "no"
    assert parse_pred_ans("yesterday") == "yes"
    assert parse_pred_ans("I don't know") == "other"  # window is "i do"
    assert parse_pred_ans(" yes") == "yes"
    assert parse_pred_ans("   yes") == "other"     # official does not strip
    assert parse_pred_ans("y") == "other"
    assert parse_pred_ans("Yes", "lmms_eval") == "yes"
    assert parse_pred_ans("   yes", "lmms_eval") == "yes"
    assert parse_pred_ans("Y.", "lmms_eval") == "yes"
    assert parse_pred_ans("n", "lmms_eval") == "no"
    assert parse_pred_ans("x", "lmms_eval") == "other"
    with pytest.raises(ValueError, match="variant"):
        parse_pred_ans("yes", "bogus")


def test_mme_scores_strip_like_llava_answer_files():
    recs = [("existence", "i", "   Yes", "yes"), ("existence", "i", "\nno\n", "no")]
    assert mme_scores(recs)["subtasks"]["existence"]["score"] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="existence"):
        mme_scores([("existence", "i", "yes", "maybe")])


def test_mme_acc_plus():
    recs = [
        # existence: img1 both right, img2 one right -> acc 3/4, acc+ 1/2
        ("existence", "img1", "Yes", "yes"),
        ("existence", "img1", "No", "no"),
        ("existence", "img2", "Yes", "yes"),
        ("existence", "img2", "Yes", "no"),
        # count: img3 both wrong, img4 both right -> acc 1/2, acc+ 1/2
        ("count", "img3", "No", "yes"),
        ("count", "img3", "I cannot tell", "no"),  # "other" is always wrong
        ("count", "img4", "yes", "yes"),
        ("count", "img4", "no", "no"),
        # cognition
        {"subtask": "code_reasoning", "image_id": "c1", "prediction": "Yes", "gt": "Yes"},
        {"subtask": "code_reasoning", "image_id": "c1", "prediction": "No", "gt": "No"},
    ]
    out = mme_scores(recs)
    ex = out["subtasks"]["existence"]
    assert ex["acc"] == pytest.approx(75.0)
    assert ex["acc_plus"] == pytest.approx(50.0)
    assert ex["score"] == pytest.approx(125.0)
    cnt = out["subtasks"]["count"]
    assert (cnt["acc"], cnt["acc_plus"], cnt["score"]) == pytest.approx((50.0, 50.0, 100.0))
    assert out["subtasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(225.0)
    assert out["cognition"] == pytest.approx(200.0)
    assert out["total"] == pytest.approx(425.0)


def test_mme_subtask_lists():
    from mllm_jax.eval.mme import COGNITION_SUBTASKS, PERCEPTION_SUBTASKS
    assert len(PERCEPTION_SUBTASKS) == 10 and len(COGNITION_SUBTASKS) == 4
    assert not set(PERCEPTION_SUBTASKS) & set(COGNITION_SUBTASKS)


# ----------------------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize("text,n,expected", [
    ("A", 4, 0),
    ("C", 4, 2),
    ("B. The plant", 3, 1),
    ("The answer is D.", 4, 3),
    ("Because X. The answer is B.", 2, 1),
    ("E", 4, INVALID),                # letter outside the available options
    ("The answer is C.", 2, INVALID),
    ("The answer is A. The answer is B.", 4, INVALID),  # ambiguous -> FAILED
    ("a", 4, INVALID),                # lowercase is not accepted by LLaVA's eval
    ("I think it's the plant", 4, INVALID),
    ("", 4, INVALID),
    (None, 4, INVALID),               # missing prediction -> FAILED
    ("The answer is B", 4, INVALID),  # regex needs a character after the letter
    ("The answer is B,", 4, 1),       # ... any character
    (" A", 4, INVALID),               # no stripping
    ("A ", 4, INVALID),
    ("A.B", 4, INVALID),              # "A. " needs the space
    ("D. ", 4, 3),
])
def test_parse_choice(text, n, expected):
    assert parse_choice(text, n) == expected


def test_scienceqa_accuracy():
    preds = ["A", "The answer is B.", "C. water", "garbage", "B"]
    answers = [0, 1, 0, 2, "B"]
    nopts = [2, 3, 4, 4, 2]
    out = scienceqa_accuracy(preds, answers, nopts,
                             subjects=["nat", "nat", "soc", "soc", "lang"])
    assert out["correct"] == 3 and out["invalid"] == 1 and out["count"] == 5
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["per_subject"] == pytest.approx({"nat": 1.0, "soc": 0.0, "lang": 1.0})
    assert math.isclose(scienceqa_accuracy([], [], [])["accuracy"], 0.0)
    assert out["img_accuracy"] is None


def test_scienceqa_img_accuracy_and_letters():
    out = scienceqa_accuracy(["A", "B", "C", None], [0, 0, 2, 1], [2, 2, 3, 2],
                             is_multimodal=[True, True, False, True])
    assert out["accuracy"] == pytest.approx(2 / 4)
    assert out["img_accuracy"] == pytest.approx(1 / 3)
    assert parse_letter("The answer is E. yes") == "E"
    assert parse_letter("nothing") == "FAILED"


def test_scienceqa_category_accuracy():
    from mllm_jax.eval.scienceqa import scienceqa_category_accuracy
    problems = [
        {"answer": 0, "subject": "natural science", "hint": "", "image": "image.png",
         "grade": "grade3"},
        {"answer": 1, "subject": "social science", "hint": "Some text", "image": None,
         "grade": "grade8"},
        {"answer": 2, "subject": "language science", "hint": "", "image": None,
         "grade": "grade12"},
        {"answer": 1, "subject": "natural science", "hint": "x", "image": "image.png",
         "grade": "grade1"},
    ]
    preds = [0, 1, INVALID, 0]
    out = scienceqa_category_accuracy(problems, preds)
    assert out["NAT"] == pytest.approx(0.5) and out["SOC"] == 1.0 and out["LAN"] == 0.0
    assert out["TXT"] == pytest.approx(0.5)      # problems 2 and 4
    assert out["IMG"] == pytest.approx(0.5)      # problems 1 and 4
    assert out["NO"] == 0.0                      # problem 3 only
    assert out["G1-6"] == pytest.approx(0.5) and out["G7-12"] == pytest.approx(0.5)
    assert out["average"] == pytest.approx(0.5)
    assert scienceqa_category_accuracy(problems[:1], [0])["SOC"] is None
    with pytest.raises(KeyError, match="answer"):
        scienceqa_category_accuracy([{"subject": "x"}], [0])
