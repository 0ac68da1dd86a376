"""ScienceQA: multiple choice answered with the option's letter."""
from __future__ import annotations

import glob
import os
import re

from mllm_jax.eval import lmms_eval_scoring, scienceqa
from mllm_jax.eval.tasks.base import (ImageRoot, LETTER_ANSWER, Sample, Task, check_limit,
                                      data_directory, image_path, read_json, require_keys,
                                      take_first)


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

    def load(self, data, image_root=None, limit=None, *,
             allow_absolute_image_paths=False):
        limit = check_limit(limit)
        root = ImageRoot(image_root or data_directory(data), allow_absolute_image_paths)
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
        problems = read_json(path)
        splits_path = os.path.join(os.path.dirname(path), "pid_splits.json")
        splits = read_json(splits_path)
        if self.split not in splits:
            raise ValueError(f"{splits_path}: no {self.split!r} split")
        samples = []
        for pid in take_first(list(splits[self.split]), limit):
            where = f"{path}: problem {pid}"
            if pid not in problems:
                raise ValueError(f"{where}: listed in {splits_path} but missing")
            p = problems[pid]
            require_keys(p, ("question", "choices", "answer"), where)
            if not 0 <= int(p["answer"]) < len(p["choices"]) <= len(scienceqa.OPTIONS):
                raise ValueError(f"{where}: answer {p['answer']} outside the "
                                 f"{len(p['choices'])} choices (at most {len(scienceqa.OPTIONS)})")
            images = ([image_path(root, os.path.join(pid, p["image"]), where)]
                      if p.get("image") else [])
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(pid), images=images,
                question=self.prompt_text(p), target=int(p["answer"]),
                meta={"num_options": len(p["choices"]), "options": list(p["choices"]),
                      "has_image": bool(images), "subject": p.get("subject")}))
        return samples

    def _load_llava(self, path, root, limit):
        entries = read_json(path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of conversations")
        samples = []
        for i, e in enumerate(take_first(entries, limit)):
            where = f"{path}: entry {i} (id {e.get('id') if isinstance(e, dict) else None})"
            require_keys(e, ("id", "conversations"), where)
            conv = e["conversations"]
            if len(conv) < 2 or "value" not in conv[0] or "value" not in conv[1]:
                raise ValueError(f"{where}: expected a human turn and a gpt turn with 'value'")
            text = conv[0]["value"].replace("<image>", "").strip()
            n = _count_options(text)
            gold = re.findall(r"The answer is ([A-E])\.", conv[1]["value"])
            if n == 0 or not gold or scienceqa.OPTIONS.index(gold[-1]) >= n:
                raise ValueError(f"{where}: expected an 'Options: (A) ...' line and a gpt turn "
                                 f"'The answer is <letter>.' within the options")
            images = [image_path(root, e["image"], where)] if e.get("image") else []
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

    def process_result_official(self, sample, response):
        pred = response.strip()
        idx = scienceqa.parse_choice(pred, sample.meta["num_options"])
        return {"exact_match": float(idx == sample.target), "prediction": pred, "pred_index": idx}

    def process_result_lmms_eval(self, sample, response):
        return {"exact_match": lmms_eval_scoring.scienceqa_exact_match(response, sample.target),
                "prediction": response.strip()}

    def aggregate_lmms_eval(self, processed, samples):
        """lmms-eval's ``scienceqa`` (every problem) and ``scienceqa_img`` (those with an
        image) means."""
        out = {"exact_match": lmms_eval_scoring.mean([p["exact_match"] for p in processed])}
        img = [p["exact_match"] for p, s in zip(processed, samples) if s.meta.get("has_image")]
        if img:
            out["exact_match_img"] = lmms_eval_scoring.mean(img)
        return out

    def aggregate_official(self, processed, samples):
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
