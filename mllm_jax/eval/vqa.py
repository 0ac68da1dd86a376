"""VQA accuracy, mirroring the official VQA evaluation script.

Mirrors ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA
(master):

* ``normalize_answer`` = ``processPunctuation`` then ``processDigitArticle``
  (after newline/tab -> space and strip), with the official punctuation list
  (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` -- no ``:`` and no ``'``),
  ``periodStrip`` / ``commaStrip`` regexes, number-word map (``none``..``ten``),
  articles and contraction map (plain ASCII apostrophes, e.g.
  ``"dont" -> "don't"``).
* Official flow per question (``gt_normalization="official"``): answers are
  whitespace-stripped; only when the annotators *disagree*
  (``len(set(answers)) > 1``) are the ground-truth answers **and** the
  prediction normalized.  When all answers agree nothing is normalized, so the
  prediction must match the released answer string exactly -- which is why
  LLaVA / lmms-eval normalize predictions before submission; here
  ``normalize_prediction=True`` (default) does that first.
* ``gt_normalization="legacy"`` is the 2016-2021 flow of the same file:
  prediction always normalized, ground truth only punctuation-processed and
  only when the annotators disagree.
* accuracy of one question = mean over the leave-one-out subsets of the answers
  of ``min(1, #matches / 3)``.
* ``vqa_score`` aggregates like ``VQAEval.setAccuracy`` (overall, per question
  type, per answer type) without the official rounding; fractions in [0, 1]
  unless ``percent=True``.
* lmms-eval's VQAv2 scoring (always normalized, EvalAI's copy of the
  normalizer) is ``lmms_eval_scoring.vqav2_accuracy``.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Sequence, Union

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = ("a", "an", "the")

# Same patterns as the official script (including its odd "(?!<=\d)" lookahead,
# which is a negative lookahead for the literal "<=" + digit, not a lookbehind).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
         ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(in_text: str, comma_strip: re.Pattern = COMMA_STRIP) -> str:
    """Official ``processPunctuation``; ``comma_strip`` is the digit-comma-digit pattern
    whose presence anywhere deletes punctuation instead of spacing it out (lmms-eval's
    EvalAI copy uses ``(?<=\\d)(\\,)+(?=\\d)``)."""
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (
                re.search(comma_strip, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # The official code passes re.UNICODE (== 32) positionally as ``count``.
    out_text = PERIOD_STRIP.sub("", out_text, count=int(re.UNICODE))
    return out_text


def process_digit_article(in_text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words -> digits,
    drop articles, expand contractions."""
    out = []
    for word in in_text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            out.append(word)
    out = [CONTRACTIONS.get(w, w) for w in out]
    return " ".join(out)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Normalize an answer as the official script does when annotators disagree:
    newline/tab -> space, strip, punctuation, number words, articles,
    contractions.  E.g. ``"Two dogs."`` -> ``"2 dogs"``, ``"a dog"`` ->
    ``"dog"``, ``"dont"`` -> ``"don't"``."""
    return process_digit_article(process_punctuation(_clean(text)))


GT_NORMALIZATIONS = ("official", "legacy", "full", "none")


def _prepare(prediction: str, gt_answers: Sequence[str], normalize_prediction: bool,
             gt_normalization: str):
    pred = normalize_answer(prediction) if normalize_prediction else _clean(prediction)
    if gt_normalization == "legacy":  # answers used as released (no strip)
        gts = list(gt_answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
        return normalize_answer(pred), gts
    gts = [_clean(a) for a in gt_answers]
    if gt_normalization == "official":
        if len(set(gts)) > 1:
            gts = [normalize_answer(a) for a in gts]
            pred = normalize_answer(pred)
    elif gt_normalization == "full":
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    elif gt_normalization != "none":
        raise ValueError(f"unknown gt_normalization {gt_normalization!r}; "
                         f"use one of {GT_NORMALIZATIONS}")
    return pred, gts


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], *,
                 normalize_prediction: bool = True,
                 gt_normalization: str = "official") -> float:
    """Official VQA accuracy of one prediction against the (typically 10)
    annotator answers: mean over the leave-one-out subsets of
    ``min(1, #matches / 3)``.

    ``normalize_prediction`` normalizes the prediction before scoring (what
    LLaVA / lmms-eval do before submitting answers).  ``gt_normalization``:
    ``"official"`` (vqaEval.py master: normalize answers and prediction only
    when the answers differ), ``"legacy"`` (vqaEval.py 2016-2021),
    ``"full"`` (always normalize both; for raw, non-VQAv2 ground truth) or
    ``"none"`` (whitespace strip only).
    """
    if not gt_answers:
        raise ValueError("gt_answers must be non-empty")
    pred, gts = _prepare(prediction, gt_answers, normalize_prediction, gt_normalization)
    matches = [g == pred for g in gts]
    total = sum(matches)
    accs = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return float(sum(accs) / len(accs))


def vqa_score(predictions: Union[Sequence[str], Mapping[object, str]],
              annotations: Union[Sequence[Mapping], Mapping[object, Mapping]], *,
              gt_normalization: str = "official",
              percent: bool = False) -> Dict[str, object]:
    """Aggregate VQA accuracy, like ``VQAEval.evaluate`` / ``setAccuracy``.

    ``predictions`` and ``annotations`` are parallel sequences, or dicts keyed
    by question id.  Each annotation is a mapping with ``"answers"`` (list of
    strings, or list of dicts with an ``"answer"`` key as in the official
    format) and optional ``"question_type"`` / ``"answer_type"``.

    Returns ``{"overall", "per_question_type", "per_answer_type",
    "per_question", "count"}``.
    """
    if isinstance(predictions, Mapping):
        if not isinstance(annotations, Mapping):
            raise TypeError("annotations must be a mapping when predictions is")
        keys = list(predictions.keys())
        preds = [predictions[k] for k in keys]
        anns = [annotations[k] for k in keys]
    else:
        keys = list(range(len(predictions)))
        preds = list(predictions)
        anns = list(annotations.values()) if isinstance(annotations, Mapping) else list(annotations)
        if len(anns) != len(preds):
            raise ValueError("predictions and annotations differ in length")

    scale = 100.0 if percent else 1.0
    per_q: Dict[object, float] = {}
    by_qtype: Dict[str, List[float]] = {}
    by_atype: Dict[str, List[float]] = {}
    for key, pred, ann in zip(keys, preds, anns):
        answers = [a["answer"] if isinstance(a, Mapping) else a for a in ann["answers"]]
        acc = vqa_accuracy(pred, answers, gt_normalization=gt_normalization)
        per_q[key] = acc * scale
        if ann.get("question_type") is not None:
            by_qtype.setdefault(ann["question_type"], []).append(acc)
        if ann.get("answer_type") is not None:
            by_atype.setdefault(ann["answer_type"], []).append(acc)

    def _mean(xs: Iterable[float]) -> float:
        xs = list(xs)
        return scale * float(sum(xs) / len(xs)) if xs else 0.0

    return {
        "overall": _mean(per_q[k] / scale for k in keys),
        "per_question_type": {k: _mean(v) for k, v in by_qtype.items()},
        "per_answer_type": {k: _mean(v) for k, v in by_atype.items()},
        "per_question": per_q,
        "count": len(keys),
    }
