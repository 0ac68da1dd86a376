"""POPE (object hallucination) yes/no metrics.

Mirrors LLaVA's ``llava/eval/eval_pope.py``, identical in its parsing and
metrics to ``evaluate.py`` of RUCAIBox/POPE:

* ``parse_yes_no``: keep only the text before the first ``"."``, drop commas,
  split on single spaces; if any word is exactly ``"No"``, ``"not"`` or
  ``"no"`` (case-sensitive) the answer is ``"no"``, otherwise ``"yes"``.  So
  ``"Not sure"`` parses as ``"yes"`` (``"Not"`` is not in the list) and
  ``"There is no dog."`` as ``"no"``.
* ``pope_metrics``: ``yes`` is the positive class; accuracy, precision,
  recall, F1 and yes-ratio (fraction of predictions that are ``yes``).
  Zero denominators give 0.0 (the official scripts raise ZeroDivisionError).
* labels: ``"yes"``/``"no"`` in any case, or 1/0; anything else is an error
  (the official scripts count every label other than exactly ``"no"`` as yes).
* lmms-eval's POPE task differs: it compares the lowercased, stripped reply
  with the label verbatim (``"Yes."`` is neither yes nor no there), and its
  yes-ratio counts labels; that variant is
  ``lmms_eval_scoring.pope_process`` / ``pope_aggregate``.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence, Union

POPE_SPLITS = ("random", "popular", "adversarial")


def parse_yes_no(text: str) -> str:
    """Parse a free-form model answer to ``"yes"``/``"no"`` (LLaVA eval_pope)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def _label_to_int(label: Union[str, int, bool]) -> int:
    if isinstance(label, str):
        s = label.strip().lower()
        if s == "yes":
            return 1
        if s == "no":
            return 0
        raise ValueError(f"label must be 'yes'/'no', got {label!r}")
    return 1 if int(label) else 0


def pope_metrics(predictions: Sequence[str], labels: Sequence[Union[str, int, bool]],
                 *, parse: bool = True) -> Dict[str, float]:
    """Accuracy / precision / recall / F1 / yes_ratio with ``yes`` positive.

    ``predictions`` are raw model outputs (parsed with ``parse_yes_no`` unless
    ``parse=False``, in which case they must already be ``"yes"``/``"no"``);
    ``labels`` are ``"yes"``/``"no"`` (or 1/0).
    """
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    preds = [_label_to_int(parse_yes_no(p) if parse else p) for p in predictions]
    gts = [_label_to_int(l) for l in labels]
    tp = sum(1 for p, g in zip(preds, gts) if p == 1 and g == 1)
    fp = sum(1 for p, g in zip(preds, gts) if p == 1 and g == 0)
    tn = sum(1 for p, g in zip(preds, gts) if p == 0 and g == 0)
    fn = sum(1 for p, g in zip(preds, gts) if p == 0 and g == 1)
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "yes_ratio": sum(preds) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "count": n,
    }


def pope_metrics_by_split(records: Iterable[Mapping]) -> Dict[str, Dict[str, float]]:
    """Per-split POPE metrics.

    ``records``: mappings with ``"split"`` (``random``/``popular``/
    ``adversarial`` or any other name), ``"prediction"`` (raw text) and
    ``"label"`` (``yes``/``no``).  Returns ``{split: pope_metrics(...)}`` plus,
    when at least one split is present, ``"average"`` = unweighted mean of each
    of accuracy/precision/recall/f1/yes_ratio over the splits.
    """
    grouped: Dict[str, tuple] = {}
    for r in records:
        preds, labels = grouped.setdefault(r["split"], ([], []))
        preds.append(r["prediction"])
        labels.append(r["label"])
    order = [s for s in POPE_SPLITS if s in grouped] + sorted(
        s for s in grouped if s not in POPE_SPLITS)
    out = {s: pope_metrics(*grouped[s]) for s in order}
    if out:
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        out["average"] = {k: sum(out[s][k] for s in order) / len(order) for k in keys}
    return out
