"""Benchmark task definitions for ``mllm-jax eval``: loaders for the published local
formats, LLaVA-1.5 prompts, per-sample scoring and the headline aggregates.

A task turns its benchmark files into ``Sample`` s (``load``), scores one generated
response (``process_result``) and reduces the per-sample results to metric name ->
value (``aggregate``).  ``process_result`` scores the response exactly as given; for
chain-of-thought runs, pass ``task.extract_answer(response)`` where
``task.answer_from_end`` is true.  The prompt of a sample is its ``question``
followed by ``task.prompt_suffix`` (images go before it, as LLaVA places them).

Metric names follow lmms-eval's tasks (``pope_f1_score``, ``exact_match``,
``mme_perception_score``, ``coco_CIDEr``, ``coco_cap_chair_s``...) and their
scales: fractions for accuracies, MME points, raw CIDEr/BLEU, CHAIR x100.
Parsing of responses follows LLaVA's evaluation scripts (see the metric modules).
Every loader raises ``ValueError`` naming the file, line or sample and what was
expected; ``image_root`` defaults to the directory holding the data.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Iterator, Optional

from mllm_jax.eval import caption, chair, mme, pope, scienceqa, vqa

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
DETAIL_PROMPT = "Please describe this image in detail."
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


@dataclasses.dataclass
class Sample:
    """One benchmark question.  ``doc_id`` (0..n-1 in load order) is unique;
    ``sample_id`` is the benchmark's own id and may repeat (POPE ids restart per
    split, MME asks two questions per image).  ``question`` holds neither the image
    token nor the task's ``prompt_suffix``; ``target`` and ``meta`` are JSON-ready."""

    doc_id: int
    sample_id: str
    images: list
    question: str
    target: object
    meta: dict


# ----------------------------------------------------------------------------- file helpers
def _read_json(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _iter_jsonl(path: str) -> Iterator[tuple]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, "
                                 f"got {type(obj).__name__}")
            yield lineno, obj


def _require(obj, keys, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} "
                         f"(expected keys {', '.join(keys)})")


def _image(root: str, rel: str, where: str) -> str:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise ValueError(f"{where}: image {path} not found (image_root={root!r})")
    return path


def _strip_suffix(text: str, suffix: str) -> str:
    text = text.strip()
    s = suffix.strip()
    if s and text.endswith(s):
        text = text[: -len(s)].strip()
    return text


def _check_limit(limit: Optional[int]) -> Optional[int]:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    return limit


def _first(items: list, limit: Optional[int]) -> list:
    return items if limit is None else items[:limit]


def _data_dir(data: str) -> str:
    return data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))


def _pair_check(processed: list, samples: list) -> None:
    if len(processed) != len(samples):
        raise ValueError(f"aggregate got {len(processed)} results for {len(samples)} samples")


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


# ----------------------------------------------------------------------------- base
class Task:
    """One benchmark: loader, prompt convention, scorer and aggregate."""

    name: str = ""
    output_type: str = "generate_until"
    max_new_tokens: int = 16
    prompt_suffix: str = ""
    answer_from_end: bool = True

    def load(self, data: str, image_root: Optional[str] = None,
             limit: Optional[int] = None) -> list:
        raise NotImplementedError

    def process_result(self, sample: Sample, response: str) -> dict:
        raise NotImplementedError

    def aggregate(self, processed: list, samples: list) -> dict:
        raise NotImplementedError

    def extract_answer(self, response: str) -> str:
        """The text after the last ``answer:`` (any case, markdown bold allowed),
        stripped; the response unchanged when there is no such marker."""
        marks = list(re.finditer(r"answer\**\s*:", response, flags=re.IGNORECASE))
        if not marks:
            return response
        return response[marks[-1].end():].strip(" \t\r\n*")

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


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

    def load(self, data, image_root=None, limit=None):
        limit = _check_limit(limit)
        root = image_root or _data_dir(data)
        samples = []
        for path in self._files(data):
            m = re.search(r"(adversarial|popular|random)", os.path.basename(path))
            for lineno, obj in _iter_jsonl(path):
                if limit is not None and len(samples) >= limit:
                    return samples
                where = f"{path}:{lineno}"
                _require(obj, ("question_id", "image", "text", "label"), where)
                label = str(obj["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"{where}: label must be yes/no, got {obj['label']!r}")
                split = obj.get("category") or (m.group(1) if m else "default")
                samples.append(Sample(
                    doc_id=len(samples), sample_id=str(obj["question_id"]),
                    images=[_image(root, obj["image"], where)],
                    question=_strip_suffix(obj["text"], SHORT_ANSWER),
                    target=label, meta={"split": split}))
        return samples

    def process_result(self, sample, response):
        return {"pope": {"prediction": pope.parse_yes_no(response), "label": sample.target,
                         "split": sample.meta["split"]}}

    def aggregate(self, processed, samples):
        _pair_check(processed, samples)
        recs = [p["pope"] for p in processed]
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        names = {"f1": "f1_score"}

        def named(metrics, prefix):
            return {f"{prefix}_{names.get(k, k)}": float(metrics[k]) for k in keys}

        out = named(pope.pope_metrics([r["prediction"] for r in recs],
                                      [r["label"] for r in recs], parse=False), "pope")
        for split in sorted({r["split"] for r in recs}):
            sub = [r for r in recs if r["split"] == split]
            out.update(named(pope.pope_metrics([r["prediction"] for r in sub],
                                               [r["label"] for r in sub], parse=False),
                             f"pope_{split}"))
        return out


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

    def load(self, data, image_root=None, limit=None):
        limit = _check_limit(limit)
        path = self._questions_file(data)
        root = image_root or _data_dir(data)
        if path.endswith(".jsonl"):
            return self._load_llava(path, root, limit)
        doc = _read_json(path)
        _require(doc, ("questions",), path)
        subtype = doc.get("data_subtype") or re.sub(
            r"^v2_OpenEnded_mscoco_|_questions\.json$", "", os.path.basename(path))
        image_split = "test2015" if subtype.startswith("test") else subtype
        answers = self._annotations(path, subtype)
        samples = []
        for i, q in enumerate(_first(doc["questions"], limit)):
            where = f"{path}: questions[{i}]"
            _require(q, ("question_id", "image_id", "question"), where)
            ann = None
            if answers is not None:
                ann = answers.get(q["question_id"])
                if ann is None:
                    raise ValueError(f"{where}: question_id {q['question_id']} has no annotation")
            file = f"COCO_{image_split}_{int(q['image_id']):012d}.jpg"
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(q["question_id"]),
                images=[_image(root, file, f"{where} (question_id {q['question_id']})")],
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
        doc = _read_json(ann_path)
        _require(doc, ("annotations",), ann_path)
        out = {}
        for i, a in enumerate(doc["annotations"]):
            _require(a, ("question_id", "answers"), f"{ann_path}: annotations[{i}]")
            out[a["question_id"]] = a
        return out

    def _load_llava(self, path, root, limit):
        samples = []
        for lineno, obj in _iter_jsonl(path):
            if limit is not None and len(samples) >= limit:
                break
            where = f"{path}:{lineno}"
            _require(obj, ("question_id", "image", "text"), where)
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(obj["question_id"]),
                images=[_image(root, obj["image"], where)],
                question=_strip_suffix(obj["text"], SHORT_ANSWER), target=None, meta={}))
        return samples

    def process_result(self, sample, response):
        acc = None if sample.target is None else vqa.vqa_accuracy(response, sample.target)
        return {"exact_match": acc, "answer": vqa.normalize_answer(response)}

    def aggregate(self, processed, samples):
        _pair_check(processed, samples)
        out = {"n": float(len(samples))}
        scored = [(p["exact_match"], s) for p, s in zip(processed, samples)
                  if p["exact_match"] is not None]
        if scored:
            out["exact_match"] = _mean(a for a, _ in scored)
            for t in sorted({s.meta.get("answer_type") for _, s in scored} - {None}):
                key = "exact_match_" + re.sub(r"\W+", "_", t)
                out[key] = _mean(a for a, s in scored if s.meta.get("answer_type") == t)
        return out


# ----------------------------------------------------------------------------- GQA
class GQATask(Task):
    """GQA ``testdev_balanced_questions.json`` ({qid: {imageId, question, answer...}}),
    images ``{imageId}.jpg``; exact match after LLaVA's ``rstrip('.').lower()``."""

    name = "gqa"
    max_new_tokens = 16
    prompt_suffix = SHORT_ANSWER

    def load(self, data, image_root=None, limit=None):
        limit = _check_limit(limit)
        path = data
        if os.path.isdir(data):
            path = os.path.join(data, "testdev_balanced_questions.json")
        root = image_root or _data_dir(data)
        doc = _read_json(path)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected an object of question id -> question")
        samples = []
        for qid, q in _first(list(doc.items()), limit):
            where = f"{path}: question {qid}"
            _require(q, ("imageId", "question", "answer"), where)
            types = q.get("types") or {}
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(qid),
                images=[_image(root, f"{q['imageId']}.jpg", where)],
                question=q["question"].strip(), target=q["answer"],
                meta={"structural": types.get("structural"), "semantic": types.get("semantic")}))
        return samples

    @staticmethod
    def normalize(response: str) -> str:
        return response.strip().rstrip(".").lower()

    def process_result(self, sample, response):
        pred = self.normalize(response)
        return {"exact_match": float(pred == sample.target), "prediction": pred}

    def aggregate(self, processed, samples):
        _pair_check(processed, samples)
        return {"exact_match": _mean(p["exact_match"] for p in processed)}


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

    def load(self, data, image_root=None, limit=None):
        limit = _check_limit(limit)
        if not os.path.isdir(data):
            raise ValueError(f"{data}: not an MME release directory")
        root = image_root or data
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
                    images=[_image(root, rel_image, where)],
                    question=_strip_suffix(question.replace("Please answer yes or no.", ""), ""),
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
                   if f.endswith(_IMAGE_EXTS)}
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

    def process_result(self, sample, response):
        return {"mme": {"subtask": sample.meta["subtask"], "image_id": sample.meta["image_id"],
                        "prediction": mme.parse_pred_ans(response), "gt": sample.target}}

    def aggregate(self, processed, samples):
        _pair_check(processed, samples)
        res = mme.mme_scores([p["mme"] for p in processed])
        out = {"mme_perception_score": res["perception"], "mme_cognition_score": res["cognition"]}
        for sub in self.SUBTASKS:
            if sub in res["subtasks"]:
                out[f"mme_{sub}_score"] = res["subtasks"][sub]["score"]
        return out


# ----------------------------------------------------------------------------- ScienceQA
class ScienceQATask(Task):
    """LLaVA's ``llava_test_CQM-A.json`` (conversations; image relative to image_root)
    or the original ``problems.json`` + ``pid_splits.json`` (split ``test``; image at
    ``<pid>/<image>``), with LLaVA's "Context/Question/Options" text; target = the
    gold choice index."""

    name = "scienceqa"
    max_new_tokens = 16
    prompt_suffix = LETTER_ANSWER
    split = "test"

    def load(self, data, image_root=None, limit=None):
        limit = _check_limit(limit)
        root = image_root or _data_dir(data)
        if os.path.isdir(data):
            if os.path.isfile(os.path.join(data, "problems.json")):
                return self._load_problems(os.path.join(data, "problems.json"), root, limit)
            found = sorted(glob.glob(os.path.join(data, "llava_test_*.json")))
            if not found:
                raise ValueError(f"{data}: neither problems.json nor llava_test_CQM-A.json found")
            return self._load_llava(found[0], root, limit)
        if os.path.basename(data) == "problems.json":
            return self._load_problems(data, root, limit)
        return self._load_llava(data, root, limit)

    @staticmethod
    def prompt_text(problem: dict) -> str:
        """LLaVA's CQM input: context (hint, or N/A), question, options "(A) x (B) y"."""
        context = " ".join([problem.get("hint") or "", ""]).strip() or "N/A"
        choices = " ".join(f"({letter}) {c}"
                           for letter, c in zip(scienceqa.OPTIONS, problem["choices"]))
        text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {choices}\n"
        return text.replace("  ", " ").strip()

    def _load_problems(self, path, root, limit):
        problems = _read_json(path)
        splits_path = os.path.join(os.path.dirname(path), "pid_splits.json")
        splits = _read_json(splits_path)
        if self.split not in splits:
            raise ValueError(f"{splits_path}: no {self.split!r} split")
        samples = []
        for pid in _first(list(splits[self.split]), limit):
            where = f"{path}: problem {pid}"
            if pid not in problems:
                raise ValueError(f"{where}: listed in {splits_path} but missing")
            p = problems[pid]
            _require(p, ("question", "choices", "answer"), where)
            if not 0 <= int(p["answer"]) < len(p["choices"]) <= len(scienceqa.OPTIONS):
                raise ValueError(f"{where}: answer {p['answer']} outside the "
                                 f"{len(p['choices'])} choices (at most {len(scienceqa.OPTIONS)})")
            images = [_image(root, os.path.join(pid, p["image"]), where)] if p.get("image") else []
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(pid), images=images,
                question=self.prompt_text(p), target=int(p["answer"]),
                meta={"num_options": len(p["choices"]), "options": list(p["choices"]),
                      "has_image": bool(images), "subject": p.get("subject")}))
        return samples

    def _load_llava(self, path, root, limit):
        entries = _read_json(path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of conversations")
        samples = []
        for i, e in enumerate(_first(entries, limit)):
            where = f"{path}: entry {i} (id {e.get('id') if isinstance(e, dict) else None})"
            _require(e, ("id", "conversations"), where)
            conv = e["conversations"]
            if len(conv) < 2 or "value" not in conv[0] or "value" not in conv[1]:
                raise ValueError(f"{where}: expected a human turn and a gpt turn with 'value'")
            text = conv[0]["value"].replace("<image>", "").strip()
            n = _count_options(text)
            gold = re.findall(r"The answer is ([A-E])\.", conv[1]["value"])
            if n == 0 or not gold or scienceqa.OPTIONS.index(gold[-1]) >= n:
                raise ValueError(f"{where}: expected an 'Options: (A) ...' line and a gpt turn "
                                 f"'The answer is <letter>.' within the options")
            images = [_image(root, e["image"], where)] if e.get("image") else []
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(e["id"]), images=images, question=text,
                target=scienceqa.OPTIONS.index(gold[-1]),
                meta={"num_options": n, "has_image": bool(images)}))
        return samples

    def extract_answer(self, response):
        """The answer part (see ``Task.extract_answer``), reduced to the letter of a
        trailing "The answer is X" when present."""
        text = super().extract_answer(response)
        letters = re.findall(r"[Tt]he answer is \(?([A-E])\)?", text)
        return letters[-1] if letters else text

    def process_result(self, sample, response):
        pred = response.strip()
        idx = scienceqa.parse_choice(pred, sample.meta["num_options"])
        return {"exact_match": float(idx == sample.target), "prediction": pred, "pred_index": idx}

    def aggregate(self, processed, samples):
        _pair_check(processed, samples)

        def acc(pairs):
            if not pairs:
                return None
            return float(scienceqa.scienceqa_accuracy(
                [p["prediction"] for p, _ in pairs], [s.target for _, s in pairs],
                [s.meta["num_options"] for _, s in pairs])["accuracy"])

        pairs = list(zip(processed, samples))
        out = {"exact_match": acc(pairs) or 0.0}
        img = acc([(p, s) for p, s in pairs if s.meta.get("has_image")])
        if img is not None:
            out["exact_match_img"] = img
        return out


def _count_options(text: str) -> int:
    """Number of consecutive "(A) ", "(B) "... choices on the "Options:" line."""
    line = re.search(r"^Options: (.*)$", text, flags=re.MULTILINE)
    choices = line.group(1) + " " if line else ""
    n = 0
    while n < len(scienceqa.OPTIONS) and f"({scienceqa.OPTIONS[n]}) " in choices:
        n += 1
    return n


# ----------------------------------------------------------------------------- COCO captions
class CocoCaptionTask(Task):
    """COCO ``captions_val2014.json`` (one sample per image, target = its captions)
    or the Karpathy split ``dataset_coco.json`` (split ``test``)."""

    name = "coco_caption"
    max_new_tokens = 128
    prompt_suffix = CAPTION_PROMPT
    answer_from_end = False

    def load(self, data, image_root=None, limit=None):
        limit = _check_limit(limit)
        root = image_root or _data_dir(data)
        path = data
        if os.path.isdir(data):
            for name in ("captions_val2014.json", "dataset_coco.json"):
                if os.path.isfile(os.path.join(data, name)):
                    path = os.path.join(data, name)
                    break
            else:
                raise ValueError(f"{data}: neither captions_val2014.json nor "
                                 "dataset_coco.json found")
        doc = _read_json(path)
        _require(doc, ("images",), path)
        if "annotations" in doc:
            return _coco_samples(path, doc, doc, root, limit, question="")
        return self._load_karpathy(path, doc, root, limit)

    @staticmethod
    def _load_karpathy(path, doc, root, limit):
        rows = [im for im in doc["images"] if isinstance(im, dict) and im.get("split") == "test"]
        samples = []
        for im in _first(rows, limit):
            where = f"{path}: image {im.get('cocoid', im.get('filename'))}"
            _require(im, ("filename", "sentences"), where)
            rel = im["filename"]
            if not os.path.isfile(os.path.join(root, rel)) and im.get("filepath"):
                rel = os.path.join(im["filepath"], im["filename"])
            refs = [s["raw"] for s in im["sentences"] if isinstance(s, dict) and "raw" in s]
            if not refs:
                raise ValueError(f"{where}: no reference sentences")
            image_id = im.get("cocoid", im.get("imgid"))
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(image_id), images=[_image(root, rel, where)],
                question="", target=refs, meta={"image_id": image_id}))
        return samples

    def extract_answer(self, response):
        return response

    def process_result(self, sample, response):
        return {"caption": response.strip()}

    def aggregate(self, processed, samples):
        _pair_check(processed, samples)
        cands = {s.doc_id: p["caption"] for p, s in zip(processed, samples)}
        refs = {s.doc_id: list(s.target) for s in samples}
        bleus = caption.bleu(cands, refs, tokenize=True)
        out = {f"coco_Bleu_{k}": float(b) for k, b in enumerate(bleus, 1)}
        out["coco_CIDEr"] = float(caption.cider_d(cands, refs, tokenize=True)[0])
        return out


def _coco_samples(path, images_doc, captions_doc, root, limit, question, objects=None):
    """One sample per image of ``images_doc`` with its reference captions."""
    refs: dict = {}
    for i, a in enumerate(captions_doc.get("annotations", [])):
        _require(a, ("image_id", "caption"), f"{path}: annotations[{i}]")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    samples = []
    for i, im in enumerate(_first(images_doc["images"], limit)):
        where = f"{path}: images[{i}]"
        _require(im, ("id", "file_name"), where)
        where = f"{path}: image id {im['id']}"
        if not refs.get(im["id"]):
            raise ValueError(f"{where}: no captions for this image")
        meta = {"image_id": im["id"]}
        target = refs[im["id"]]
        if objects is not None:
            meta["captions"] = target
            target = objects(im["id"], target)
        samples.append(Sample(
            doc_id=len(samples), sample_id=str(im["id"]),
            images=[_image(root, im["file_name"], where)], question=question,
            target=target, meta=meta))
    return samples


# ----------------------------------------------------------------------------- CHAIR
@functools.lru_cache(maxsize=1)
def _chair_evaluator() -> chair.ChairEvaluator:
    return chair.ChairEvaluator()


class ChairTask(Task):
    """CHAIR on COCO: ``instances_val2014.json`` + ``captions_val2014.json`` (``data``
    = their directory or either file); target = the image's ground-truth objects
    (segmentation labels + objects named in its reference captions); ``meta["captions"]``
    holds the reference captions."""

    name = "chair"
    max_new_tokens = 512
    prompt_suffix = DETAIL_PROMPT
    answer_from_end = False

    @staticmethod
    def _paths(data: str) -> tuple:
        if not os.path.exists(data):
            raise ValueError(f"{data}: no such COCO annotation file or directory")
        if os.path.isdir(data):
            return (os.path.join(data, "instances_val2014.json"),
                    os.path.join(data, "captions_val2014.json"))
        folder, base = os.path.split(data)
        if base.startswith("instances_"):
            return data, os.path.join(folder, "captions_" + base[len("instances_"):])
        if base.startswith("captions_"):
            return os.path.join(folder, "instances_" + base[len("captions_"):]), data
        raise ValueError(f"{data}: expected a COCO instances_*.json / captions_*.json file "
                         "or their directory")

    def load(self, data, image_root=None, limit=None):
        limit = _check_limit(limit)
        inst_path, caps_path = self._paths(data)
        root = image_root or _data_dir(data)
        instances, captions = _read_json(inst_path), _read_json(caps_path)
        _require(instances, ("images", "annotations", "categories"), inst_path)
        names = {c["id"]: c["name"] for c in instances["categories"]}
        seg: dict = {}
        for i, a in enumerate(instances["annotations"]):
            _require(a, ("image_id", "category_id"), f"{inst_path}: annotations[{i}]")
            if a["category_id"] not in names:
                raise ValueError(f"{inst_path}: annotations[{i}]: unknown category_id "
                                 f"{a['category_id']}")
            seg.setdefault(a["image_id"], set()).add(names[a["category_id"]])
        ev = _chair_evaluator()

        def objects(image_id, refs):
            return sorted(ev.ground_truth(seg.get(image_id, ()), refs))

        return _coco_samples(caps_path, instances, captions, root, limit, question="",
                             objects=objects)

    def extract_answer(self, response):
        return response

    @staticmethod
    def target_text(sample: Sample) -> str:
        """A reference caption (the answer of a few-shot demonstration)."""
        return sample.meta["captions"][0]

    def process_result(self, sample, response):
        text = response.strip()
        mentioned = _chair_evaluator().mentioned_objects(text)
        gt = set(sample.target)
        return {"chair": {"caption": text, "mentioned": mentioned,
                          "hallucinated": [o for o in mentioned if o not in gt],
                          "num_words": len(text.split())}}

    def aggregate(self, processed, samples):
        _pair_check(processed, samples)
        caps = {s.doc_id: p["chair"]["caption"] for p, s in zip(processed, samples)}
        res = _chair_evaluator().chair(caps, {s.doc_id: s.target for s in samples})
        covered = sum(len(set(p["chair"]["mentioned"]) & set(s.target))
                      for p, s in zip(processed, samples))
        total = sum(len(set(s.target)) for s in samples)
        return {
            "coco_cap_chair_s": 100.0 * res["chair_s"],
            "coco_cap_chair_i": 100.0 * res["chair_i"],
            "coco_cap_recall": 100.0 * covered / total if total else 0.0,
            "coco_cap_avg_len": _mean(p["chair"]["num_words"] for p in processed),
        }


# ----------------------------------------------------------------------------- registry
TASKS = {t.name: t for t in (PopeTask(), VQAv2Task(), GQATask(), MMETask(), ChairTask(),
                             ScienceQATask(), CocoCaptionTask())}


def get_task(name: str) -> Task:
    """The task registered under ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
