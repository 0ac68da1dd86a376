"""Scoring a LLaVA model on the held-out shapes-world questions: VQA accuracy per question
kind, POPE (random / popular / adversarial) F1, CHAIR_i / CHAIR_s of detailed captions and
CIDEr-D of short captions."""
from __future__ import annotations

import json
import os

import numpy as np

from mllm_jax.data import image as image_lib
from mllm_jax.demo import shapes
from mllm_jax.eval.caption import cider_d
from mllm_jax.eval.pope import pope_metrics
from mllm_jax.infer.batching import Conversation, generate_all

TEMPLATE = "mistral"  # no system prompt: the world's tokenizer has no words for one
# The questions are asked bare: no answer-format instruction after them, in training and in
# evaluation (recorded in the exported model, `infer.chat_template`).
PROMPT_SUFFIXES = {"short_answer": ""}
IMAGE_PREFIX = "<image>\n"  # how a question's image placeholder precedes it
LONG_KINDS = ("caption", "detail")  # answered with up to long_new_tokens
SKIPPED_KINDS = ("fewshot",)  # multi-image episodes: the demo trains on one image per sample


def eval_entries(data_dir: str, split: str = "val") -> list:
    """The scored entries of eval_{split}.json (few-shot episodes left out)."""
    path = os.path.join(data_dir, f"eval_{split}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; shapes.write_dataset writes it for every "
                                f"split but train")
    with open(path, encoding="utf-8") as f:
        return [e for e in json.load(f) if e["kind"] not in SKIPPED_KINDS]


def write_pope_files(entries, data_dir: str, out_dir: str) -> str:
    """The entries' POPE questions as POPE's question files (coco_pope_{mode}.json: JSON
    lines of question_id, image (relative to `data_dir`), text, label) in `out_dir`, which
    `mllm-jax eval --task pope --data OUT_DIR --image-root DATA_DIR` reads. Returns
    `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    for mode in shapes.POPE_MODES:
        with open(os.path.join(out_dir, f"coco_pope_{mode}.json"), "w", encoding="utf-8") as f:
            for e in entries:
                if e["kind"] == "pope" and e["pope_mode"] == mode:
                    text = e["conversations"][0]["value"]
                    if text.startswith(IMAGE_PREFIX):
                        text = text[len(IMAGE_PREFIX):]
                    f.write(json.dumps({"question_id": e["id"], "image": e["image"],
                                        "text": text, "label": e["answer"],
                                        "category": mode}) + "\n")
    return out_dir


def image_config(model_cfg) -> image_lib.ImageProcessorConfig:
    """CLIP preprocessing at the model's resolution (what the training pipeline uses)."""
    size = model_cfg.vision.image_size
    return image_lib.ImageProcessorConfig(mode="crop", size={"shortest_edge": size},
                                          crop_size=size)


def predict(model, params, tokenizer, entries, data_dir, *, batch_size=128,
            short_new_tokens=48, long_new_tokens=96, progress=None) -> list:
    """Greedy answers to each entry's question (its first user turn), in entry order."""
    image_cfg = image_config(model.cfg)
    answers = [None] * len(entries)
    for long in (False, True):
        idx = [i for i, e in enumerate(entries) if (e["kind"] in LONG_KINDS) == long]
        convs = [Conversation([entries[i]["conversations"][0]],
                              [os.path.join(data_dir, entries[i]["image"])], entries[i]["id"])
                 for i in idx]
        out = generate_all(model, params, tokenizer, image_cfg, convs, TEMPLATE,
                           batch_size=batch_size, pad_to_multiple=16, progress=progress,
                           max_new_tokens=long_new_tokens if long else short_new_tokens)
        for i, a in zip(idx, out):
            answers[i] = a
    return answers


def score(entries, answers, world: shapes.World = shapes.World()) -> dict:
    """{metric: value}: vqa_<kind> and vqa_mean (accuracy), pope_<mode>_f1 /
    pope_<mode>_accuracy / pope_<mode>_yes_ratio, chair_i, chair_s, cider."""
    out = {}
    vqa = [(e, a) for e, a in zip(entries, answers) if e["kind"] in shapes.VQA_KINDS]
    acc = shapes.accuracy_by_kind([e for e, _ in vqa], [a for _, a in vqa], world)
    for kind in shapes.VQA_KINDS:
        if kind in acc:
            out[f"vqa_{kind}"] = acc[kind]
    out["vqa_mean"] = float(np.mean([acc[k] for k in shapes.VQA_KINDS if k in acc]))
    for mode in shapes.POPE_MODES:
        pairs = [(a, e["answer"]) for e, a in zip(entries, answers)
                 if e["kind"] == "pope" and e["pope_mode"] == mode]
        if pairs:
            m = pope_metrics([p for p, _ in pairs], [g for _, g in pairs])
            out.update({f"pope_{mode}_f1": m["f1"], f"pope_{mode}_accuracy": m["accuracy"],
                        f"pope_{mode}_yes_ratio": m["yes_ratio"]})
    details = {e["id"]: a for e, a in zip(entries, answers) if e["kind"] == "detail"}
    if details:
        gt = {e["id"]: e["objects"] for e in entries if e["kind"] == "detail"}
        chair = shapes.chair_scores(details, gt, world)
        out.update(chair_i=float(chair["chair_i"]), chair_s=float(chair["chair_s"]))
    caps = {e["id"]: a for e, a in zip(entries, answers) if e["kind"] == "caption"}
    if caps:
        refs = {e["id"]: e["references"] for e in entries if e["kind"] == "caption"}
        out["cider"], _ = cider_d(caps, refs, tokenize=True)
        out["cider"] = float(out["cider"])
    return out


def evaluate(model, params, tokenizer, entries, data_dir, world=shapes.World(), **kw
             ) -> tuple:
    """(metrics, answers) of the model on `entries`; `kw` go to `predict`."""
    answers = predict(model, params, tokenizer, entries, data_dir, **kw)
    return score(entries, answers, world), answers
