"""VQAv2 and GQA: short open answers."""
from __future__ import annotations

import glob
import os
import re

from mllm_jax.eval import lmms_eval_scoring, vqa
from mllm_jax.eval.tasks.base import (ImageRoot, SHORT_ANSWER, Sample, Task, check_limit,
                                      data_directory, image_path, iter_jsonl, mean_or_zero,
                                      read_json, require_keys, strip_suffix, take_first)


# ----------------------------------------------------------------------------- VQAv2
class VQAv2Task(Task):
    """Official ``v2_OpenEnded_mscoco_<subtype>_questions.json`` + matching
    ``v2_mscoco_<subtype>_annotations.json`` (target = the 10 answers), or LLaVA's
    JSON-lines question files (question_id, image, text; no answers)."""

    name = "vqav2"
    max_new_tokens = 16
    prompt_suffix = SHORT_ANSWER

    @staticmethod
    def _questions_file(data: str) -> str:
        if os.path.isfile(data):
            return data
        if not os.path.isdir(data):
            raise ValueError(f"{data}: no such VQAv2 questions file or directory")
        found = sorted(glob.glob(os.path.join(data, "v2_OpenEnded_mscoco_*_questions.json")))
        found = found or sorted(glob.glob(os.path.join(data, "*.jsonl")))
        if len(found) > 1:
            found = [f for f in found if "_val2014_" in f] or found
        if len(found) != 1:
            raise ValueError(f"{data}: expected one v2_OpenEnded_mscoco_*_questions.json (or "
                             f"LLaVA .jsonl), found {[os.path.basename(f) for f in found]}; "
                             "pass the file")
        return found[0]

    def load(self, data, image_root=None, limit=None, *,
             allow_absolute_image_paths=False):
        limit = check_limit(limit)
        path = self._questions_file(data)
        root = ImageRoot(image_root or data_directory(data), allow_absolute_image_paths)
        if path.endswith(".jsonl"):
            return self._load_llava(path, root, limit)
        doc = read_json(path)
        require_keys(doc, ("questions",), path)
        subtype = doc.get("data_subtype") or re.sub(
            r"^v2_OpenEnded_mscoco_|_questions\.json$", "", os.path.basename(path))
        image_split = "test2015" if subtype.startswith("test") else subtype
        answers = self._annotations(path, subtype)
        samples = []
        for i, q in enumerate(take_first(doc["questions"], limit)):
            where = f"{path}: questions[{i}]"
            require_keys(q, ("question_id", "image_id", "question"), where)
            ann = None
            if answers is not None:
                ann = answers.get(q["question_id"])
                if ann is None:
                    raise ValueError(f"{where}: question_id {q['question_id']} has no annotation")
            file = f"COCO_{image_split}_{int(q['image_id']):012d}.jpg"
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(q["question_id"]),
                images=[image_path(root, file, f"{where} (question_id {q['question_id']})")],
                question=q["question"].strip(),
                target=None if ann is None else [a["answer"] for a in ann["answers"]],
                meta={} if ann is None else {"answer_type": ann.get("answer_type"),
                                             "question_type": ann.get("question_type")}))
        return samples

    @staticmethod
    def _annotations(questions_path: str, subtype: str):
        ann_path = os.path.join(os.path.dirname(questions_path),
                                f"v2_mscoco_{subtype}_annotations.json")
        if not os.path.isfile(ann_path):
            if subtype.startswith("test"):
                return None
            raise ValueError(f"{questions_path}: annotation file {ann_path} not found "
                             "(needed for the answers of a train/val split)")
        doc = read_json(ann_path)
        require_keys(doc, ("annotations",), ann_path)
        out = {}
        for i, a in enumerate(doc["annotations"]):
            require_keys(a, ("question_id", "answers"), f"{ann_path}: annotations[{i}]")
            out[a["question_id"]] = a
        return out

    def _load_llava(self, path, root, limit):
        samples = []
        for lineno, obj in iter_jsonl(path):
            if limit is not None and len(samples) >= limit:
                break
            where = f"{path}:{lineno}"
            require_keys(obj, ("question_id", "image", "text"), where)
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(obj["question_id"]),
                images=[image_path(root, obj["image"], where)],
                question=strip_suffix(obj["text"], SHORT_ANSWER), target=None, meta={}))
        return samples

    def process_result_official(self, sample, response):
        acc = None if sample.target is None else vqa.vqa_accuracy(response, sample.target)
        return {"exact_match": acc, "answer": vqa.normalize_answer(response)}

    def process_result_lmms_eval(self, sample, response):
        """lmms-eval's ``vqav2_process_results`` (no accuracy without answers: test split)."""
        acc, answer = lmms_eval_scoring.vqav2_accuracy(response, sample.target or [])
        return {"exact_match": None if sample.target is None else acc, "answer": answer}

    def aggregate_official(self, processed, samples):
        return self._aggregate(processed, samples, mean_or_zero)

    def aggregate_lmms_eval(self, processed, samples):
        return self._aggregate(processed, samples, lmms_eval_scoring.mean)

    @staticmethod
    def _aggregate(processed, samples, mean):
        """The mean accuracy (lmms-eval's ``vqav2_val``) and the mean per answer type."""
        out = {"n": float(len(samples))}
        scored = [(p["exact_match"], s) for p, s in zip(processed, samples)
                  if p["exact_match"] is not None]
        if scored:
            out["exact_match"] = mean([a for a, _ in scored])
            for t in sorted({s.meta.get("answer_type") for _, s in scored} - {None}):
                key = "exact_match_" + re.sub(r"\W+", "_", t)
                out[key] = mean([a for a, s in scored if s.meta.get("answer_type") == t])
        return out


# ----------------------------------------------------------------------------- GQA
class GQATask(Task):
    """GQA ``testdev_balanced_questions.json`` ({qid: {imageId, question, answer...}}),
    images ``{imageId}.jpg``; exact match after LLaVA's ``rstrip('.').lower()`` (lmms-eval:
    case and every punctuation character ignored)."""

    name = "gqa"
    max_new_tokens = 16
    prompt_suffix = SHORT_ANSWER

    def load(self, data, image_root=None, limit=None, *,
             allow_absolute_image_paths=False):
        limit = check_limit(limit)
        path = data
        if os.path.isdir(data):
            path = os.path.join(data, "testdev_balanced_questions.json")
        root = ImageRoot(image_root or data_directory(data), allow_absolute_image_paths)
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected an object of question id -> question")
        samples = []
        for qid, q in take_first(list(doc.items()), limit):
            where = f"{path}: question {qid}"
            require_keys(q, ("imageId", "question", "answer"), where)
            types = q.get("types") or {}
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(qid),
                images=[image_path(root, f"{q['imageId']}.jpg", where)],
                question=q["question"].strip(), target=q["answer"],
                meta={"structural": types.get("structural"), "semantic": types.get("semantic")}))
        return samples

    @staticmethod
    def normalize(response: str) -> str:
        return response.strip().rstrip(".").lower()

    def process_result_official(self, sample, response):
        pred = self.normalize(response)
        return {"exact_match": float(pred == sample.target), "prediction": pred}

    def process_result_lmms_eval(self, sample, response):
        score, pred = lmms_eval_scoring.exact_match_ignoring_case_and_punctuation(
            response, sample.target)
        return {"exact_match": score, "prediction": pred}

    def aggregate_official(self, processed, samples):
        return {"exact_match": mean_or_zero(p["exact_match"] for p in processed)}

    def aggregate_lmms_eval(self, processed, samples):
        return {"exact_match": lmms_eval_scoring.mean([p["exact_match"] for p in processed])}
