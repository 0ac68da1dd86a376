"""ScienceQA multiple-choice accuracy.

Mirrors LLaVA's ``llava/eval/eval_science_qa.py``:

* ``parse_choice``: the prediction is the letter itself (``"A"``); or starts
  with ``"<letter>. "`` (``"B. some text"``); or contains exactly one match of
  ``r"The answer is ([A-Z])."``; otherwise ``"FAILED"``.  The letter must be
  one of the first ``num_options`` of ``A B C D E`` (``get_pred_idx``),
  otherwise the index is ``-1`` (``INVALID``) and is counted wrong (LLaVA's
  default; it does not fall back to a random choice).
* a missing prediction (``None``) is ``"FAILED"``, as for problems absent
  from LLaVA's answer file.  No stripping: ``" A"`` or ``"A "`` fail.
* ``scienceqa_accuracy``: fraction of problems whose parsed index equals the
  gold index (LLaVA prints it x100); with ``is_multimodal`` (LLaVA: the prompt
  contains ``<image>``) also ``img_accuracy`` over those problems.  The
  regex's ``.`` matches any character, so ``"The answer is B"`` without a
  following character fails while ``"The answer is B,"`` parses.
* lmms-eval parses differently (``"a"`` and ``"A.dog"`` right, ``"The answer is
  A."`` wrong): ``lmms_eval_scoring.scienceqa_exact_match``.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Sequence, Union

OPTIONS = ("A", "B", "C", "D", "E")
INVALID = -1
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: Optional[str], options: Sequence[str] = OPTIONS) -> str:
    """The answer letter LLaVA's eval_science_qa.py extracts, or ``"FAILED"``."""
    if text is None:
        return "FAILED"
    options = list(options)
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    res = _ANSWER_IS.findall(text)
    return res[0] if len(res) == 1 else "FAILED"


def parse_choice(text: Optional[str], num_options: int,
                 options: Sequence[str] = OPTIONS) -> int:
    """Return the 0-based option index, or ``INVALID`` (-1)."""
    options = list(options)
    answer = parse_letter(text, options)
    if answer in options[:num_options]:
        return options.index(answer)
    return INVALID


def _gold_index(answer: Union[int, str], options: Sequence[str]) -> int:
    if isinstance(answer, str):
        return list(options).index(answer.strip())
    return int(answer)


def scienceqa_accuracy(predictions: Sequence[Optional[str]],
                       answers: Sequence[Union[int, str]],
                       num_options: Sequence[int], *,
                       options: Sequence[str] = OPTIONS,
                       subjects: Optional[Sequence[str]] = None,
                       is_multimodal: Optional[Sequence[bool]] = None) -> Dict[str, object]:
    """Accuracy over problems.

    ``answers``: gold 0-based indices (as in ScienceQA ``problems.json``) or
    letters; ``num_options``: ``len(choices)`` per problem.  Optional
    ``subjects`` (e.g. ``"natural science"``) adds a per-subject breakdown;
    optional ``is_multimodal`` flags add ``img_accuracy`` (LLaVA's
    IMG-Accuracy; ``None`` when not given or no problem is flagged).
    Returns ``{"accuracy", "correct", "invalid", "count", "per_subject",
    "img_accuracy"}``.
    """
    n = len(predictions)
    if not (len(answers) == len(num_options) == n):
        raise ValueError("predictions, answers and num_options differ in length")
    if subjects is not None and len(subjects) != n:
        raise ValueError("subjects differ in length")
    if is_multimodal is not None and len(is_multimodal) != n:
        raise ValueError("is_multimodal differs in length")
    img_flags = []
    correct = invalid = 0
    per_subject: Dict[str, list] = {}
    for i, (pred, ans, k) in enumerate(zip(predictions, answers, num_options)):
        idx = parse_choice(pred, k, options)
        ok = idx != INVALID and idx == _gold_index(ans, options)
        correct += ok
        invalid += idx == INVALID
        if subjects is not None:
            per_subject.setdefault(subjects[i], []).append(ok)
        if is_multimodal is not None and is_multimodal[i]:
            img_flags.append(ok)
    return {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "invalid": invalid,
        "count": n,
        "per_subject": {s: sum(v) / len(v) for s, v in per_subject.items()},
        "img_accuracy": sum(img_flags) / len(img_flags) if img_flags else None,
    }


CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
_SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
_LOW_GRADES = {f"grade{i}" for i in range(1, 7)}
_HIGH_GRADES = {f"grade{i}" for i in range(7, 13)}


def _in_category(problem: Mapping, category: str) -> bool:
    if category in _SUBJECTS:
        return problem.get("subject") == _SUBJECTS[category]
    if category == "TXT":
        return bool(problem.get("hint"))
    if category == "IMG":
        return bool(problem.get("image"))
    if category == "NO":
        return not problem.get("hint") and not problem.get("image")
    return problem.get("grade") in (_LOW_GRADES if category == "G1-6" else _HIGH_GRADES)


def scienceqa_category_accuracy(problems: Sequence[Mapping],
                                pred_indices: Sequence[int]) -> Dict[str, Optional[float]]:
    """Accuracy per ScienceQA category, as lupantech/ScienceQA
    ``tools/evaluate_acc.py`` reports it (the table in the LLaVA paper).

    ``problems``: entries of ``problems.json`` (``answer``, ``subject``,
    ``hint``, ``image``, ``grade``); ``pred_indices``: parsed indices
    (``INVALID`` counts as wrong).  Subject: NAT/SOC/LAN; context: TXT (has a
    hint), IMG (has an image), NO (neither); grade: G1-6, G7-12; plus
    ``average``.  Fractions in [0, 1]; ``None`` for an empty category (the
    official script prints -1).
    """
    if len(problems) != len(pred_indices):
        raise ValueError("problems and pred_indices differ in length")
    for i, p in enumerate(problems):
        if "answer" not in p:
            raise KeyError(f"problem {i} has no 'answer' (expected a problems.json entry)")
    ok = [int(pred) == int(p["answer"]) for p, pred in zip(problems, pred_indices)]
    out: Dict[str, Optional[float]] = {}
    for cat in CATEGORIES:
        flags = [f for p, f in zip(problems, ok) if _in_category(p, cat)]
        out[cat] = sum(flags) / len(flags) if flags else None
    out["average"] = sum(ok) / len(ok) if ok else None
    return out
