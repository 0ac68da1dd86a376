"""The records of the data set's files, one scene at a time: stage-1 captions, stage-2
instructions, DPO pairs (on detailed captions and on yes/no questions), eval entries, and the
text corpus for language-model pre-training.
"""
from __future__ import annotations

import numpy as np

from mllm_jax.demo.captions import (CAPTION_PROMPT, DETAIL_PROMPT, detailed_caption,
                                    hallucinated_companion, short_caption, with_extra_object)
from mllm_jax.demo.questions import (INSTRUCT_WEIGHTS, VQA_KINDS, conversation,
                                     existence_negative, existence_question, fewshot_episode,
                                     negatives, pope_questions, question, statistics)
from mllm_jax.demo.scenes import (STREAM_CAPTION, STREAM_EVAL, STREAM_FEWSHOT, STREAM_INSTRUCT,
                                  STREAM_PREFERENCE, STREAM_YESNO_PREFERENCE, World, image_path,
                                  scene_rng)


def caption_record(scene, seed, split, index, world=World()) -> dict:
    """Stage 1: the short caption (with the scene's hallucinated companion, if any)."""
    rng = scene_rng(seed, split, index, STREAM_CAPTION)
    extra = hallucinated_companion(scene, seed, split, index, world)
    objects = with_extra_object(scene, extra, rng, world) if extra else None
    caption = short_caption(objects or scene.objects, rng, world,
                            style=int(rng.integers(3)))
    return {"id": scene.id, "image": image_path(scene.id),
            "conversations": conversation([(CAPTION_PROMPT, caption)]),
            "hallucinated": [extra] if objects else []}


def instruct_record(scene, seed, split, index, world=World(), stats=None, turns: int = 3,
                    weights=None) -> dict:
    """Stage 2: `turns` questions of kinds drawn by `weights` (default INSTRUCT_WEIGHTS);
    detailed captions carry the scene's hallucinated companion, if any."""
    rng = scene_rng(seed, split, index, STREAM_INSTRUCT)
    weights = weights or INSTRUCT_WEIGHTS
    kinds, p = list(weights), np.asarray(list(weights.values()), float)
    pairs, used, hallucinated = [], [], []
    for _ in range(20 * turns):
        if len(pairs) == turns:
            break
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        qa = question(kind, scene, rng, world, stats)
        if qa is None or qa["question"] in {q for q, _ in pairs}:
            continue
        if kind in ("detail", "caption"):
            extra = hallucinated_companion(scene, seed, split, index, world)
            objects = with_extra_object(scene, extra, rng, world) if extra else None
            if objects:
                hallucinated.append(extra)
            objects = objects or scene.objects
            qa["answer"] = (detailed_caption(objects, rng, world) if kind == "detail" else
                            short_caption(objects, rng, world, style=int(rng.integers(3))))
        pairs.append((qa["question"], qa["answer"]))
        used.append(kind)
    return {"id": scene.id, "image": image_path(scene.id), "conversations": conversation(pairs),
            "kinds": used, "hallucinated": sorted(set(hallucinated))}


def preference_record(scene, seed, split, index, world=World(), stats=None):
    """DPO pair: chosen = the faithful detailed caption, rejected = the same with an absent
    object added (the missing companion when there is one, else the absent object
    co-occurring most, else a random absent one). None if no cell is free."""
    rng = scene_rng(seed, split, index, STREAM_PREFERENCE)
    present = set(scene.names)
    missing = sorted({world.companions[n] for n in present} - present)
    if missing:
        extra = missing[int(rng.integers(len(missing)))]
    elif stats is not None:
        extra = negatives(present, "adversarial", stats, rng, 1)[0]
    else:
        absent = [o for o in world.objects if o not in present]
        extra = absent[int(rng.integers(len(absent)))]
    objects = with_extra_object(scene, extra, rng, world)
    if objects is None:
        return None
    return {"id": scene.id, "image": image_path(scene.id), "prompt": "<image>\n" + DETAIL_PROMPT,
            "chosen": detailed_caption(scene.objects, None, world),
            "rejected": detailed_caption(objects, None, world), "rejected_object": extra}


def yesno_preference_record(scene, seed, split, index, world=World(), stats=None) -> dict:
    """DPO pair on a POPE-style question: about an object the scene holds (chosen "yes",
    rejected "no") or, half the time, about an absent one from `existence_negative` (chosen
    "no", rejected "yes": the answer that claims an absent object)."""
    rng = scene_rng(seed, split, index, STREAM_YESNO_PREFERENCE)
    names = scene.names
    if rng.random() < 0.5:
        name, chosen, rejected = names[int(rng.integers(len(names)))], "yes", "no"
    else:
        name = existence_negative(names, rng, world, stats or statistics([scene], world))
        chosen, rejected = "no", "yes"
    return {"id": f"{scene.id}-yesno", "image": image_path(scene.id),
            "prompt": "<image>\n" + existence_question(name), "chosen": chosen,
            "rejected": rejected, "object": name,
            "rejected_object": name if rejected == "yes" else None}


def eval_records(scenes, seed, split, world=World(), stats=None, fewshot_k: int = 2) -> list:
    """Single-question records with `kind`, `answer`, the scene's `objects`, and per kind:
    `references` (caption), `pope_mode` and `object` (pope), `count` (cot_count), `style`
    (fewshot). Fewshot records hold k+1 images."""
    stats = stats or statistics(scenes, world)
    out = []
    for index, scene in enumerate(scenes):
        rng = scene_rng(seed, split, index, STREAM_EVAL)
        base = {"image": image_path(scene.id), "objects": sorted(set(scene.names)),
                "scene": scene.id}

        def add(kind, q, a, **extra):
            out.append({"id": f"{scene.id}-{kind}-{len(out)}", **base, "kind": kind,
                        "conversations": conversation([(q, a)]), "answer": a, **extra})

        refs = [short_caption(scene.objects, None, world, style=s) for s in range(3)]
        add("caption", CAPTION_PROMPT, refs[0], references=refs)
        add("detail", DETAIL_PROMPT, detailed_caption(scene.objects, None, world))
        for kind in VQA_KINDS:
            qa = question(kind, scene, rng, world, stats)
            if qa is not None:
                qa.pop("kind")
                add(kind, qa.pop("question"), qa.pop("answer"), **qa)
        for item in pope_questions(scene, stats, rng):
            add("pope", item["question"], item["answer"], pope_mode=item["mode"],
                object=item["object"])
        if fewshot_k and len(scenes) > fewshot_k:
            ep = fewshot_episode(scenes, index, fewshot_k,
                                 scene_rng(seed, split, index, STREAM_FEWSHOT), world, stats)
            out.append({"id": f"{scene.id}-fewshot-{len(out)}", **base,
                        "image": [image_path(i) for i in ep["images"]],
                        "conversations": ep["conversations"], "kind": "fewshot",
                        "question_kind": ep["kind"], "style": ep["style"],
                        "answer": ep["answer"]})
    return out


def corpus_lines(scenes, seed, split, world=World(), stats=None) -> list:
    """The world's text for language-model pre-training: per scene, its short training
    caption, and its faithful detailed caption followed by questions and answers in the
    USER:/ASSISTANT: form of the chat template (so the answers follow from the text)."""
    lines = []
    for index, scene in enumerate(scenes):
        lines.append(caption_record(scene, seed, split, index, world)["conversations"][1]
                     ["value"])
        rec = instruct_record(scene, seed, split, index, world, stats, turns=3,
                              weights={k: w for k, w in INSTRUCT_WEIGHTS.items()
                                       if k not in ("detail", "caption")})
        qa = " ".join(f"USER: {q['value'].replace('<image>', '').strip()} ASSISTANT: "
                      f"{a['value']}" for q, a in zip(rec["conversations"][::2],
                                                      rec["conversations"][1::2]))
        lines.append(f"{detailed_caption(scene.objects, None, world)} {qa}")
    return lines
