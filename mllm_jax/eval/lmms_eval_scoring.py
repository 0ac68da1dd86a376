"""Scoring as lmms-eval 0.7.3 does it (``mllm-jax eval --scoring lmms_eval``).

Each function reproduces one ``process_results`` or aggregation function of lmms-eval's
tasks (``lmms_eval/tasks/<task>/utils.py``, the task YAML's ``metric_list``, and
``lmms_eval/api/metrics.py`` for ``mean``), quirks included, so that numbers can be set
beside papers that report lmms-eval's. lmms-eval strips every generated answer before
scoring it (``ConfigurableTask.process_results``); every per-sample function here does
the same. What differs from the official scripts (``pope.py``, ``mme.py``, ``vqa.py``,
``scienceqa.py``, ``chair.py``, ``caption.py``):

* POPE (``pope/utils.py``): the answer, lowercased, must be exactly ``yes`` or ``no``
  (``"Yes."`` or ``"Yes, there is"`` is wrong either way); an answer that is neither is
  no positive and no negative, so it lowers accuracy but never precision or recall.
  lmms-eval's ``pope_yes_ratio`` is the share of *labels* that are yes (0.5 on POPE),
  not of answers: it is reported here as ``yes_ratio_of_labels``.
* GQA (``gqa.yaml``: ``exact_match`` with ``ignore_case``, ``ignore_punctuation``):
  both sides lowercased and stripped of every ``string.punctuation`` character, then
  compared as they are (inner and trailing spaces count).
* ScienceQA (``scienceqa/utils.py``): right when the answer, lowercased, is the letter
  (``"a"``), or when it starts with an upper-case letter and a period (``"A."``,
  ``"A. dog"``, ``"A.dog"``) and that letter is right; ``"(A)"`` or ``"The answer is
  A."`` are wrong.
* MME (``mme/utils.py``): the parser strips, drops periods and takes ``y``/``n``
  (``mme.parse_pred_ans(..., "lmms_eval")``); a category's score is the mean over its
  images of (accuracy + both-right) x100, and every image must have two questions.
* VQAv2 (``vqav2/utils.py``): answers and the prediction are always normalized (the
  official script only when the annotators disagree), with the EvalAI copy of the
  normalizer (its digit-comma pattern ``(?<=\\d)(\\,)+(?=\\d)``), one annotator left out
  at a time, ``statistics.mean``.
* CHAIR (``coco_cap_chair/utils.py``): words are ``nltk.word_tokenize``-d, POS-tagged
  with ``nltk.pos_tag`` and lemmatized with WordNet (the official rules singularize with
  ``pattern``); the tables (objects, synonyms, double words) are the official ones.
* COCO captions (``coco_cap/utils.py``): the same pycocoevalcap scorers as the official
  toolkit (BLEU, CIDEr-D, PTB tokenizer), plus ROUGE-L; METEOR (a Java program) is not
  computed.
"""
from __future__ import annotations

import functools
import re
import statistics
import string
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from mllm_jax.eval import chair, mme, vqa

# ----------------------------------------------------------------------------- POPE


def pope_process(response: str, label: str) -> dict:
    """``pope_process_results``: score 1.0 iff the lowercased answer is the label."""
    pred = response.strip().lower().strip()
    gt = str(label).lower().strip()
    if gt not in ("yes", "no"):
        raise ValueError(f"POPE label must be yes/no, got {label!r}")
    return {"score": 1.0 if pred == gt else 0.0, "prediction": pred, "ground_truth": gt}


def pope_aggregate(results: Sequence[Mapping]) -> dict:
    """``pope_aggregate_{accuracy,precision,recall,f1_score,yes_ratio}`` over
    ``pope_process`` results; the last is named ``yes_ratio_of_labels`` here."""
    if not results:
        raise ValueError("POPE needs at least one result")
    tp = sum(r["ground_truth"] == "yes" and r["prediction"] == "yes" for r in results)
    fp = sum(r["ground_truth"] == "no" and r["prediction"] == "yes" for r in results)
    fn = sum(r["ground_truth"] == "yes" and r["prediction"] == "no" for r in results)
    precision = tp / (tp + fp) if tp + fp > 0 else 0
    recall = tp / (tp + fn) if tp + fn > 0 else 0
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0
    yes = sum(r["ground_truth"] == "yes" for r in results)
    no = sum(r["ground_truth"] == "no" for r in results)
    return {"accuracy": sum(r["score"] for r in results) / len(results),
            "precision": float(precision), "recall": float(recall), "f1_score": float(f1),
            "yes_ratio_of_labels": yes / (yes + no) if yes + no > 0 else 0.0}


# ----------------------------------------------------------------------------- GQA
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match_ignoring_case_and_punctuation(response: str, target: str) -> tuple:
    """(score, normalized answer): ``exact_match_hf_evaluate`` with ``ignore_case`` and
    ``ignore_punctuation`` on the stripped answer (GQA's metric)."""
    pred = response.strip().lower().translate(_NO_PUNCTUATION)
    return float(pred == str(target).lower().translate(_NO_PUNCTUATION)), pred


# ----------------------------------------------------------------------------- ScienceQA
def scienceqa_exact_match(response: str, answer_index: int) -> float:
    """``sqa_process_results``: the answer against the gold option's letter."""
    target = chr(ord("A") + int(answer_index)).lower()
    pred = response.strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return 1.0 if pred[0].lower() == target else 0.0
    return 0.0


def mean(values: Sequence[float]) -> float:
    """lmms-eval's ``mean`` aggregation."""
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- MME
def mme_process(response: str, answer: str) -> dict:
    """``mme_process_results``: the parsed answer and its score."""
    gt = str(answer).lower().strip().replace(".", "")
    if gt not in ("yes", "no"):
        raise ValueError(f"MME answer must be yes/no, got {answer!r}")
    pred = mme.parse_pred_ans(response.strip(), "lmms_eval")
    return {"prediction": pred, "gt": gt, "score": 1.0 if pred == gt else 0.0}


def mme_category_scores(results: Iterable[Mapping]) -> dict:
    """``mme_aggregate_results`` per category: results are mappings with ``subtask``,
    ``image_id`` (lmms-eval's question_id, the image) and ``score``; a category's score
    is the mean over its images of acc + acc_plus (x100). Categories in first-seen order;
    an image without exactly two questions is an error, as in lmms-eval."""
    by_category: dict = {}
    for r in results:
        by_category.setdefault(r["subtask"], {}).setdefault(r["image_id"], []).append(
            r["score"])
    out = {}
    for category, images in by_category.items():
        total = 0
        for image, scores in images.items():
            if len(scores) != 2:
                raise ValueError(f"MME {category} image {image!r} has {len(scores)} "
                                 "question(s); lmms-eval's MME score needs the two of each "
                                 "image (do not --limit MME with --scoring lmms_eval)")
            total += (sum(scores) == 2) * 100.0 + sum(scores) / len(scores) * 100.0
        out[category] = total / len(images)
    return out


def mme_aggregate(results: Sequence[Mapping]) -> dict:
    """``mme_perception_score`` / ``mme_cognition_score`` (sums of category scores, a
    category outside the perception list counted as cognition; a side with no results
    is left out, as lmms-eval has nothing to aggregate there) and the category scores
    lmms-eval logs."""
    out = {}
    for side, is_side in (("perception", True), ("cognition", False)):
        scores = mme_category_scores(
            r for r in results if (r["subtask"] in mme.PERCEPTION_SUBTASKS) == is_side)
        if scores:
            out[side] = sum(scores.values())
            out.update(scores)
    return out


# ----------------------------------------------------------------------------- VQAv2
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def evalai_normalize(text: str) -> str:
    """What ``vqav2_process_results`` does to an answer: newline/tab -> space, strip,
    EvalAI ``process_punctuation`` and ``process_digit_article``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa.process_digit_article(vqa.process_punctuation(text, EVALAI_COMMA_STRIP))


def vqav2_accuracy(response: str, answers: Sequence[str]) -> tuple:
    """(accuracy, normalized answer) of ``vqav2_process_results``: every annotator
    answer and the answer normalized, then for each annotator ``min(1, matches among the
    others / 3)``, averaged with ``statistics.mean`` (0 without answers)."""
    pred = evalai_normalize(response.strip())
    gts = [evalai_normalize(a) for a in answers]
    if not gts:
        return 0, pred
    accs = [min(1, float(sum(g == pred for j, g in enumerate(gts) if j != i)) / 3)
            for i in range(len(gts))]
    return statistics.mean(accs), pred


# ----------------------------------------------------------------------------- CHAIR
class Nlp(NamedTuple):
    """The three nltk steps of lmms-eval's ``caption_to_words``."""

    word_tokenize: Callable[[str], list]
    pos_tag: Callable[[list], list]
    lemmatize: Callable[[str, str], str]


_POS_MISSING = ("lmms-eval's CHAIR tokenizes, POS-tags and lemmatizes captions with nltk; "
                "for --scoring lmms_eval on chair install it (pip install nltk) and its data "
                "(python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet)")


@functools.lru_cache(maxsize=1)
def nltk_pipeline() -> Nlp:
    """nltk's ``word_tokenize``, ``pos_tag`` and ``WordNetLemmatizer().lemmatize``;
    RuntimeError saying what to install when nltk or its data is missing."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError:
        raise RuntimeError(_POS_MISSING) from None
    lemmatizer = WordNetLemmatizer()
    try:
        lemmatizer.lemmatize(nltk.pos_tag(nltk.word_tokenize("two dogs."))[1][0], pos="n")
    except LookupError as e:  # nltk's message: a banner around "Resource ... not found."
        lines = [x.strip() for x in str(e).splitlines() if "Resource" in x] or [str(e)]
        raise RuntimeError(f"{_POS_MISSING} ({lines[0]})") from None
    return Nlp(nltk.word_tokenize, nltk.pos_tag, lemmatizer.lemmatize)


def _wordnet_pos(tag: str) -> str:
    """``get_wordnet_pos``, with its default: adjective, verb, adverb, else noun."""
    for prefix, pos in (("J", "a"), ("V", "v"), ("N", "n"), ("R", "r")):
        if tag.startswith(prefix):
            return pos
    return "n"


@functools.lru_cache(maxsize=1)
def _coco_inverse() -> dict:
    return chair.ChairEvaluator().inverse


def chair_words(caption: str, nlp: Nlp | None = None) -> list:
    """The COCO objects (``node_words``, with repeats) of ``caption_to_words`` on the
    stripped caption; ``nlp`` defaults to :func:`nltk_pipeline`."""
    nlp = nlp or nltk_pipeline()
    tagged = nlp.pos_tag(nlp.word_tokenize(caption.strip().lower()))
    lemmas = [nlp.lemmatize(word, _wordnet_pos(tag)) for word, tag in tagged]
    inverse = _coco_inverse()
    return [inverse[w] for w in chair.merge_coco_words(lemmas) if w in inverse]


def chair_aggregate(results: Sequence[tuple]) -> dict:
    """``coco_cap_chair_aggregate_results_{chair_i,chair_s,recall}`` (x100) over
    ``(ground-truth objects, chair_words)`` pairs. CHAIR_i is 0.0 when nothing is
    mentioned (lmms-eval divides by zero)."""
    mentioned = hallucinated = hallucinating = matched = total = 0
    for gt, words in results:
        bad = sum(w not in gt for w in words)
        mentioned += len(words)
        hallucinated += bad
        hallucinating += bad > 0
        matched += len(set(gt) & set(words))
        total += len(set(gt))
    return {"chair_i": (hallucinated / mentioned) * 100 if mentioned else 0.0,
            "chair_s": (hallucinating / len(results)) * 100,
            "recall": (matched / total) * 100}
