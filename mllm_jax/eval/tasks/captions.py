"""COCO captions (CIDEr-D, BLEU) and CHAIR (hallucinated objects in detailed descriptions)."""
from __future__ import annotations

import functools
import os

from mllm_jax.eval import caption, chair, lmms_eval_scoring, rouge
from mllm_jax.eval.tasks.base import (ImageRoot, CAPTION_PROMPT, DETAIL_PROMPT, Sample, Task,
                                      check_limit, check_scoring, data_directory, image_path,
                                      mean_or_zero, read_json, require_keys, take_first)


# ----------------------------------------------------------------------------- COCO captions
class CocoCaptionTask(Task):
    """COCO ``captions_val2014.json`` (one sample per image, target = its captions)
    or the Karpathy split ``dataset_coco.json`` (split ``test``)."""

    name = "coco_caption"
    max_new_tokens = 128
    prompt_suffix = CAPTION_PROMPT
    answer_from_end = False

    def load(self, data, image_root=None, limit=None, *,
             allow_absolute_image_paths=False):
        limit = check_limit(limit)
        root = ImageRoot(image_root or data_directory(data), allow_absolute_image_paths)
        path = data
        if os.path.isdir(data):
            for name in ("captions_val2014.json", "dataset_coco.json"):
                if os.path.isfile(os.path.join(data, name)):
                    path = os.path.join(data, name)
                    break
            else:
                raise ValueError(f"{data}: neither captions_val2014.json nor "
                                 "dataset_coco.json found")
        doc = read_json(path)
        require_keys(doc, ("images",), path)
        if "annotations" in doc:
            return _coco_samples(path, doc, doc, root, limit, question="")
        return self._load_karpathy(path, doc, root, limit)

    @staticmethod
    def _load_karpathy(path, doc, root, limit):
        rows = [im for im in doc["images"] if isinstance(im, dict) and im.get("split") == "test"]
        samples = []
        for im in take_first(rows, limit):
            where = f"{path}: image {im.get('cocoid', im.get('filename'))}"
            require_keys(im, ("filename", "sentences"), where)
            rel = im["filename"]
            if not os.path.isfile(os.path.join(root, rel)) and im.get("filepath"):
                rel = os.path.join(im["filepath"], im["filename"])
            refs = [s["raw"] for s in im["sentences"] if isinstance(s, dict) and "raw" in s]
            if not refs:
                raise ValueError(f"{where}: no reference sentences")
            image_id = im.get("cocoid", im.get("imgid"))
            samples.append(Sample(
                doc_id=len(samples), sample_id=str(image_id), images=[image_path(root, rel, where)],
                question="", target=refs, meta={"image_id": image_id}))
        return samples

    def extract_answer(self, response):
        return response

    def process_result_official(self, sample, response):
        return {"caption": response.strip()}

    process_result_lmms_eval = process_result_official

    def aggregate_official(self, processed, samples):
        cands = {s.doc_id: p["caption"] for p, s in zip(processed, samples)}
        refs = {s.doc_id: list(s.target) for s in samples}
        bleus = caption.bleu(cands, refs, tokenize=True)
        out = {f"coco_Bleu_{k}": float(b) for k, b in enumerate(bleus, 1)}
        out["coco_CIDEr"] = float(caption.cider_d(cands, refs, tokenize=True)[0])
        return out

    def aggregate_lmms_eval(self, processed, samples):
        """lmms-eval's ``coco_aggregation_result``: the official toolkit's BLEU and CIDEr-D
        (the same pycocoevalcap scorers) and its ROUGE-L; METEOR (Java) is left out."""
        out = self.aggregate_official(processed, samples)
        cands = {s.doc_id: p["caption"] for p, s in zip(processed, samples)}
        out["coco_ROUGE_L"] = rouge.rouge_l(cands, {s.doc_id: list(s.target) for s in samples},
                                            tokenize=True)[0]
        return out


def _coco_samples(path, images_doc, captions_doc, root, limit, question, objects=None):
    """One sample per image of ``images_doc`` with its reference captions."""
    refs: dict = {}
    for i, a in enumerate(captions_doc.get("annotations", [])):
        require_keys(a, ("image_id", "caption"), f"{path}: annotations[{i}]")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    samples = []
    for i, im in enumerate(take_first(images_doc["images"], limit)):
        where = f"{path}: images[{i}]"
        require_keys(im, ("id", "file_name"), where)
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
            images=[image_path(root, im["file_name"], where)], question=question,
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

    def load(self, data, image_root=None, limit=None, *,
             allow_absolute_image_paths=False):
        limit = check_limit(limit)
        inst_path, caps_path = self._paths(data)
        root = ImageRoot(image_root or data_directory(data), allow_absolute_image_paths)
        instances, captions = read_json(inst_path), read_json(caps_path)
        require_keys(instances, ("images", "annotations", "categories"), inst_path)
        names = {c["id"]: c["name"] for c in instances["categories"]}
        seg: dict = {}
        for i, a in enumerate(instances["annotations"]):
            require_keys(a, ("image_id", "category_id"), f"{inst_path}: annotations[{i}]")
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

    def require_scoring(self, scoring):
        if check_scoring(scoring) == "lmms_eval":
            try:
                lmms_eval_scoring.nltk_pipeline()
            except RuntimeError as e:  # what to install, as a usage error of the option
                raise ValueError(f"--scoring lmms_eval on chair: {e}") from None

    def process_result_official(self, sample, response):
        return self._record(response.strip(), _chair_evaluator().mentioned_objects,
                            sample.target)

    def process_result_lmms_eval(self, sample, response):
        return self._record(response.strip(), lmms_eval_scoring.chair_words, sample.target)

    @staticmethod
    def _record(text, objects, target):
        mentioned = objects(text)
        gt = set(target)
        return {"chair": {"caption": text, "mentioned": mentioned,
                          "hallucinated": [o for o in mentioned if o not in gt],
                          "num_words": len(text.split())}}

    def aggregate_lmms_eval(self, processed, samples):
        """lmms-eval's ``coco_cap_chair`` metrics over the objects its ``caption_to_words``
        finds; the ground truth is the task's (COCO segmentation + reference captions)."""
        res = lmms_eval_scoring.chair_aggregate(
            [(s.target, p["chair"]["mentioned"]) for p, s in zip(processed, samples)])
        return {"coco_cap_chair_s": res["chair_s"], "coco_cap_chair_i": res["chair_i"],
                "coco_cap_recall": res["recall"]}

    def aggregate_official(self, processed, samples):
        caps = {s.doc_id: p["chair"]["caption"] for p, s in zip(processed, samples)}
        res = _chair_evaluator().chair(caps, {s.doc_id: s.target for s in samples})
        covered = sum(len(set(p["chair"]["mentioned"]) & set(s.target))
                      for p, s in zip(processed, samples))
        total = sum(len(set(s.target)) for s in samples)
        return {
            "coco_cap_chair_s": 100.0 * res["chair_s"],
            "coco_cap_chair_i": 100.0 * res["chair_i"],
            "coco_cap_recall": 100.0 * covered / total if total else 0.0,
            "coco_cap_avg_len": mean_or_zero(p["chair"]["num_words"] for p in processed),
        }
