"""MME benchmark scoring.

Mirrors ``eval_tool/calculation.py`` of the official MME release
(BradyFU/Awesome-Multimodal-Large-Language-Models, branch ``Evaluation``,
``tools/eval_tool.zip``), which LLaVA's MME script runs:

* answer parsing (``parse_pred_ans``): the prediction is lowercased (not
  stripped); exactly ``"yes"``/``"no"`` as is; otherwise only its first 4
  characters count: contains ``"yes"`` -> yes, else contains ``"no"`` -> no,
  else ``"other"`` (always wrong).  ``variant="lmms_eval"`` is lmms-eval's
  parser instead (strip, drop ``"."``, single ``"y"``/``"n"`` accepted).
* predictions are stripped before parsing in ``mme_scores``, as LLaVA's
  answer files hold ``outputs.strip()``; ground truth is lowercased.
* per subtask: ``acc`` = fraction of questions right; ``acc_plus`` = fraction
  of images whose questions (two per image in MME) are *all* right;
  ``score = 100 * acc + 100 * acc_plus``.
* ``perception`` = sum of scores over the 10 perception subtasks,
  ``cognition`` = sum over the 4 cognition subtasks (only subtasks present in
  the records contribute).  Accuracies here are reported x100 as in the
  official script.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence, Tuple, Union

PERCEPTION_SUBTASKS = (
    "existence", "count", "position", "color", "posters", "celebrity",
    "scene", "landmark", "artwork", "OCR",
)
COGNITION_SUBTASKS = (
    "commonsense_reasoning", "numerical_calculation", "text_translation",
    "code_reasoning",
)


PARSE_VARIANTS = ("official", "lmms_eval")


def parse_pred_ans(pred_ans: str, variant: str = "official") -> str:
    """MME answer parser -> ``"yes"``, ``"no"`` or ``"other"``.

    ``"official"``: calculation.py (``" yes"`` -> yes, ``"   yes"`` -> other:
    leading spaces use up the 4-character window).  ``"lmms_eval"``:
    lmms-eval's ``mme/utils.py`` parser.
    """
    if variant == "official":
        pred_ans = pred_ans.lower()
    elif variant == "lmms_eval":
        pred_ans = pred_ans.lower().strip().replace(".", "")
        if len(pred_ans) == 1:
            return {"y": "yes", "n": "no"}.get(pred_ans, "other")
    else:
        raise ValueError(f"unknown MME parse variant {variant!r}; use one of {PARSE_VARIANTS}")
    if pred_ans in ("yes", "no"):
        return pred_ans
    prefix = pred_ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


Record = Union[Mapping, Sequence]


def _unpack(r: Record) -> Tuple[str, object, str, str]:
    if isinstance(r, Mapping):
        return r["subtask"], r["image_id"], r["prediction"], r["gt"]
    subtask, image_id, prediction, gt = r
    return subtask, image_id, prediction, gt


def mme_scores(records: Iterable[Record], *, variant: str = "official") -> Dict[str, object]:
    """Score MME.

    ``records``: tuples ``(subtask, image_id, prediction, gt)`` or mappings
    with those keys; ``gt`` is ``"yes"``/``"no"``; ``prediction`` raw text.
    ``variant`` selects the answer parser (see ``parse_pred_ans``).

    Returns ``{"subtasks": {name: {"acc", "acc_plus", "score", "num_questions",
    "num_images"}}, "perception": float, "cognition": float, "total": float}``.
    """
    per_task: Dict[str, Dict[object, list]] = {}
    for r in records:
        subtask, image_id, prediction, gt = _unpack(r)
        gt_l = str(gt).strip().lower()
        if variant == "lmms_eval":
            gt_l = gt_l.replace(".", "")
        if gt_l not in ("yes", "no"):
            raise ValueError(f"MME record ({subtask!r}, {image_id!r}): gt must be yes/no, "
                             f"got {gt!r}")
        correct = parse_pred_ans(str(prediction).strip(), variant) == gt_l
        per_task.setdefault(subtask, {}).setdefault(image_id, []).append(correct)

    subtasks: Dict[str, Dict[str, float]] = {}
    for name, images in per_task.items():
        flags = [c for v in images.values() for c in v]
        acc = 100.0 * sum(flags) / len(flags)
        acc_plus = 100.0 * sum(1 for v in images.values() if all(v)) / len(images)
        subtasks[name] = {
            "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
            "num_questions": len(flags), "num_images": len(images),
        }
    perception = sum(subtasks[t]["score"] for t in PERCEPTION_SUBTASKS if t in subtasks)
    cognition = sum(subtasks[t]["score"] for t in COGNITION_SUBTASKS if t in subtasks)
    return {
        "subtasks": subtasks,
        "perception": float(perception),
        "cognition": float(cognition),
        "total": float(perception + cognition),
    }
