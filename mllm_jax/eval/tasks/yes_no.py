"""POPE and MME: yes/no questions, scored with the official parsers or lmms-eval's."""
from __future__ import annotations

import glob
import os
import re

from mllm_jax.eval import lmms_eval_scoring, mme, pope
from mllm_jax.eval.tasks.base import (ImageRoot, IMAGE_EXTENSIONS, SHORT_ANSWER, Sample, Task,
                                      check_limit, data_directory, image_path, iter_jsonl,
                                      require_keys, strip_suffix)


# ----------------------------------------------------------------------------- POPE
class PopeTask(Task):
    """POPE question files ``coco_pope_{adversarial,popular,random}.json`` (JSON lines:
    question_id, image, text, label); ``data`` is one file or a directory of them."""

    name = "pope"
    max_new_tokens = 16
    prompt_suffix = SHORT_ANSWER

    @staticmethod
    def _files(data: str) -> list:
        if os.path.isfile(data):
            return [data]
        if not os.path.isdir(data):
            raise ValueError(f"{data}: no such POPE question file or directory")
        files = sorted(glob.glob(os.path.join(data, "coco_pope_*.json")))
        files = files or sorted(glob.glob(os.path.join(data, "*pope*.json*")))
        if not files:
            raise ValueError(f"{data}: no POPE question files "
                             "(expected coco_pope_adversarial/popular/random.json)")
        return files

    def load(self, data, image_root=None, limit=None, *,
             allow_absolute_image_paths=False):
        limit = check_limit(limit)
        root = ImageRoot(image_root or data_directory(data), allow_absolute_image_paths)
        samples = []
        for path in self._files(data):
            m = re.search(r"(adversarial|popular|random)", os.path.basename(path))
            for lineno, obj in iter_jsonl(path):
                if limit is not None and len(samples) >= limit:
                    return samples
                where = f"{path}:{lineno}"
                require_keys(obj, ("question_id", "image", "text", "label"), where)
                label = str(obj["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"{where}: label must be yes/no, got {obj['label']!r}")
                split = obj.get("category") or (m.group(1) if m else "default")
                samples.append(Sample(
                    doc_id=len(samples), sample_id=str(obj["question_id"]),
                    images=[image_path(root, obj["image"], where)],
                    question=strip_suffix(obj["text"], SHORT_ANSWER),
                    target=label, meta={"split": split}))
        return samples

    def process_result_official(self, sample, response):
        return {"pope": {"prediction": pope.parse_yes_no(response), "label": sample.target,
                         "split": sample.meta["split"]}}

    def aggregate_official(self, processed, samples):
        recs = [p["pope"] for p in processed]
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        names = {"f1": "f1_score"}

        def metrics(sub):
            m = pope.pope_metrics([r["prediction"] for r in sub], [r["label"] for r in sub],
                                  parse=False)
            return {names.get(k, k): float(m[k]) for k in keys}

        return self._by_split(recs, metrics)

    def process_result_lmms_eval(self, sample, response):
        return {"pope": {"question_id": sample.sample_id, "split": sample.meta["split"],
                         **lmms_eval_scoring.pope_process(response, sample.target)}}

    def aggregate_lmms_eval(self, processed, samples):
        """lmms-eval's ``pope`` metrics over all questions, and per split its
        ``pope_adv`` / ``pope_pop`` / ``pope_random`` tasks' (``pope_<split>_...``)."""
        return self._by_split([p["pope"] for p in processed], lmms_eval_scoring.pope_aggregate)

    @staticmethod
    def _by_split(recs, metrics):
        out = {f"pope_{k}": v for k, v in metrics(recs).items()}
        for split in sorted({r["split"] for r in recs}):
            sub = [r for r in recs if r["split"] == split]
            out.update({f"pope_{split}_{k}": v for k, v in metrics(sub).items()})
        return out


# ----------------------------------------------------------------------------- MME
class MMETask(Task):
    """The MME release directory: one folder per subtask holding either ``images/`` +
    ``questions_answers_YN/<image>.txt`` or images and ``<image>.txt`` side by side;
    each txt line is ``question<TAB>answer`` (``image<TAB>question<TAB>answer`` also
    accepted)."""

    name = "mme"
    max_new_tokens = 16
    prompt_suffix = SHORT_ANSWER
    SUBTASKS = mme.PERCEPTION_SUBTASKS + mme.COGNITION_SUBTASKS

    def load(self, data, image_root=None, limit=None, *,
             allow_absolute_image_paths=False):
        limit = check_limit(limit)
        if not os.path.isdir(data):
            raise ValueError(f"{data}: not an MME release directory")
        root = ImageRoot(image_root or data, allow_absolute_image_paths)
        subtasks = [s for s in self.SUBTASKS if os.path.isdir(os.path.join(data, s))]
        if not subtasks:
            raise ValueError(f"{data}: no MME subtask folders "
                             f"(expected some of {', '.join(self.SUBTASKS)})")
        samples = []
        for sub in subtasks:
            for rel_image, question, answer, where in self._subtask_rows(data, sub):
                if limit is not None and len(samples) >= limit:
                    return samples
                samples.append(Sample(
                    doc_id=len(samples), sample_id=rel_image,
                    images=[image_path(root, rel_image, where)],
                    question=strip_suffix(question.replace("Please answer yes or no.", ""), ""),
                    target=answer, meta={"subtask": sub, "image_id": rel_image}))
        return samples

    @staticmethod
    def _subtask_rows(root: str, sub: str):
        folder = os.path.join(root, sub)
        if os.path.isdir(os.path.join(folder, "questions_answers_YN")):
            qa_dir, img_rel = os.path.join(folder, "questions_answers_YN"), f"{sub}/images"
        else:
            qa_dir, img_rel = folder, sub
        img_dir = os.path.join(root, img_rel)
        if not os.path.isdir(img_dir):
            raise ValueError(f"{folder}: image folder {img_dir} not found")
        by_stem = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(img_dir))
                   if f.endswith(IMAGE_EXTENSIONS)}
        txts = sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt"))
        if not txts:
            raise ValueError(f"{qa_dir}: no question .txt files")
        for txt in txts:
            path = os.path.join(qa_dir, txt)
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    fields = line.split("\t")
                    if len(fields) == 2:
                        stem = os.path.splitext(txt)[0]
                        if stem not in by_stem:
                            raise ValueError(f"{where}: no image named {stem}.* in {img_dir}")
                        image, (question, answer) = by_stem[stem], fields
                    elif len(fields) == 3:
                        image, question, answer = fields
                    else:
                        raise ValueError(f"{where}: expected 'question<TAB>answer', got "
                                         f"{len(fields)} tab-separated fields")
                    answer = answer.strip().lower()
                    if answer not in ("yes", "no"):
                        raise ValueError(f"{where}: answer must be Yes/No, got {fields[-1]!r}")
                    yield f"{img_rel}/{image.strip()}", question, answer, where

    def process_result_official(self, sample, response):
        return {"mme": {"subtask": sample.meta["subtask"], "image_id": sample.meta["image_id"],
                        "prediction": mme.parse_pred_ans(response), "gt": sample.target}}

    def aggregate_official(self, processed, samples):
        res = mme.mme_scores([p["mme"] for p in processed])
        out = {"mme_perception_score": res["perception"], "mme_cognition_score": res["cognition"]}
        for sub in self.SUBTASKS:
            if sub in res["subtasks"]:
                out[f"mme_{sub}_score"] = res["subtasks"][sub]["score"]
        return out

    def process_result_lmms_eval(self, sample, response):
        return {"mme": {"subtask": sample.meta["subtask"], "image_id": sample.meta["image_id"],
                        **lmms_eval_scoring.mme_process(response, sample.target)}}

    def aggregate_lmms_eval(self, processed, samples):
        res = lmms_eval_scoring.mme_aggregate([p["mme"] for p in processed])
        out = {f"mme_{side}_score": res[side] for side in ("perception", "cognition")
               if side in res}
        out.update({f"mme_{sub}_score": res[sub] for sub in self.SUBTASKS if sub in res})
        return out
