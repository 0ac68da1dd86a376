"""Questions about scenes: object statistics and POPE items, the question kinds of the
instruction mixture and of evaluation, LLaVA conversations, and few-shot episodes. Counts are
answered with digits.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax.demo.captions import (CAPTION_PROMPT, DETAIL_PROMPT, NUMBER_WORDS, box_text,
                                    count_cot, detailed_caption, object_phrase, short_caption,
                                    with_article)
from mllm_jax.demo.scenes import Scene, World
from mllm_jax.eval.chair import pluralize

POPE_MODES = ("random", "popular", "adversarial")
# Question kinds of the instruction mixture and their weights.
INSTRUCT_WEIGHTS = {"existence": 3, "count": 2, "colour": 2, "position": 1, "box": 1,
                    "what_at": 1, "cot_count": 1, "detail": 1, "caption": 1}
VQA_KINDS = ("existence", "count", "colour", "position", "box", "what_at", "cot_count")
FEWSHOT_KINDS = ("count", "colour", "existence")


# ---- statistics and POPE -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Statistics:
    """Per object: the number of scenes holding it (`frequency`), and for each pair the
    number of scenes holding both (`cooccurrence`, symmetric, zero diagonal)."""
    objects: tuple
    frequency: np.ndarray
    cooccurrence: np.ndarray

    def index(self, name) -> int:
        return self.objects.index(name)


def statistics(scenes, world: World = World()) -> Statistics:
    k = {name: i for i, name in enumerate(world.objects)}
    present = np.zeros((len(scenes), len(k)), np.int64)
    for row, scene in enumerate(scenes):
        for name in scene.names:
            present[row, k[name]] = 1
    co = present.T @ present
    np.fill_diagonal(co, 0)
    return Statistics(world.objects, present.sum(0), co)


def negatives(present, mode: str, stats: Statistics, rng, n: int) -> list:
    """`n` objects absent from `present`: "random", "popular" (the most frequent objects in
    `stats`), or "adversarial" (those co-occurring most with the present objects)."""
    present = set(present)
    absent = [k for k, o in enumerate(stats.objects) if o not in present]
    n = min(n, len(absent))
    if mode == "random":
        picked = [absent[int(i)] for i in rng.permutation(len(absent))[:n]]
    elif mode in ("popular", "adversarial"):
        keys = [-stats.frequency[absent]]
        if mode == "adversarial":
            rows = [stats.index(p) for p in present]
            keys.append(-stats.cooccurrence[np.ix_(rows, absent)].sum(0))
        # lexsort: last key first; ties end in vocabulary order
        picked = [absent[int(i)] for i in np.lexsort([np.arange(len(absent))] + keys)[:n]]
    else:
        raise ValueError(f"unknown POPE mode {mode!r}; one of {POPE_MODES}")
    return [stats.objects[k] for k in picked]


def confusable_negative(names, rng, world: World = World()):
    """An absent object whose colour and whose shape both occur in the scene, on different
    objects (a red square where a red circle and a blue square are), or None: the negative
    that tests whether a model binds colours to shapes."""
    present = set(names)
    colours, kinds = {n.split(" ")[0] for n in names}, {n.split(" ")[1] for n in names}
    pool = [o for o in world.objects if o not in present
            and o.split(" ")[0] in colours and o.split(" ")[1] in kinds]
    return pool[int(rng.integers(len(pool)))] if pool else None


def existence_negative(names, rng, world: World = World(), stats=None) -> str:
    """The absent object a "no" existence question asks about: with `World.confusable_rate`
    a `confusable_negative` (when the scene has one), else a POPE negative of a random mode
    from `stats` (a uniformly drawn absent object without stats)."""
    name = confusable_negative(names, rng, world) if world.confusable_rate > 0 \
        and rng.random() < world.confusable_rate else None
    if name is not None:
        return name
    if stats is None:
        absent = [o for o in world.objects if o not in names]
        return absent[int(rng.integers(len(absent)))]
    return negatives(names, POPE_MODES[int(rng.integers(3))], stats, rng, 1)[0]


def existence_question(name) -> str:
    return f"is there {with_article(name)} in the image?"


def pope_questions(scene: Scene, stats: Statistics, rng, max_positives: int = 3) -> list:
    """POPE items of a scene: up to `max_positives` present objects ("yes") and as many
    absent ones ("no") per mode. Dicts {mode, object, question, answer}."""
    present = sorted(set(scene.names))
    positives = [present[int(i)] for i in rng.permutation(len(present))[:max_positives]]
    out = []
    for mode in POPE_MODES:
        for name in positives:
            out.append(dict(mode=mode, object=name, question=existence_question(name),
                            answer="yes"))
        for name in negatives(present, mode, stats, rng, len(positives)):
            out.append(dict(mode=mode, object=name, question=existence_question(name),
                            answer="no"))
    return out


# ---- questions ---------------------------------------------------------------------------
def _unique(scene):
    counts = {}
    for o in scene.objects:
        counts[o.name] = counts.get(o.name, 0) + 1
    return [o for o in scene.objects if counts[o.name] == 1]


def question(kind: str, scene: Scene, rng, world: World = World(), stats=None):
    """One question of `kind` about the scene: {kind, question, answer, ...} or None when the
    kind does not apply (e.g. no shape occurs exactly once for "colour")."""
    names = scene.names
    if kind == "existence":
        absent = [o for o in world.objects if o not in names]
        if rng.random() < 0.5 or not absent:
            name = names[int(rng.integers(len(names)))]
            return dict(kind=kind, question=existence_question(name), answer="yes",
                        object=name)
        name = existence_negative(names, rng, world, stats)
        return dict(kind=kind, question=existence_question(name), answer="no", object=name)
    if kind in ("count", "cot_count"):
        present = sorted({o.shape for o in scene.objects})
        absent = [s for s in world.shapes if s not in present]
        if kind == "count" and rng.random() < 0.2:
            return dict(kind=kind, question="how many objects are there?",
                        answer=str(len(names)))
        pool = absent if absent and rng.random() < 0.2 else present
        shape = pool[int(rng.integers(len(pool)))]
        n = sum(o.shape == shape for o in scene.objects)
        q = f"how many {pluralize(shape)} are there?"
        if kind == "cot_count":
            return dict(kind=kind, question=q + " think step by step.",
                        answer=count_cot(scene, shape), count=n)
        return dict(kind=kind, question=q, answer=str(n))
    if kind == "colour":
        shapes = [s for s in world.shapes if sum(o.shape == s for o in scene.objects) == 1]
        if not shapes:
            return None
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = next(o.colour for o in scene.objects if o.shape == shape)
        return dict(kind=kind, question=f"what colour is the {shape}?", answer=colour)
    if kind in ("position", "box"):
        unique = _unique(scene)
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        if kind == "position":
            return dict(kind=kind, question=f"where is the {o.name}?",
                        answer=world.cell_name(o.cell), object=o.name)
        return dict(kind=kind, question=f"where is the {o.name}? give its box.",
                    answer=box_text(o.bbox, world), object=o.name)
    if kind == "what_at":
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        return dict(kind=kind, question=f"what is at {box_text(o.bbox, world)}?",
                    answer=object_phrase(o), object=o.name)
    if kind == "detail":
        return dict(kind=kind, question=DETAIL_PROMPT, answer=detailed_caption(scene.objects,
                                                                               None, world))
    if kind == "caption":
        return dict(kind=kind, question=CAPTION_PROMPT, answer=short_caption(scene.objects,
                                                                             None, world))
    raise ValueError(f"unknown question kind {kind!r}; one of {sorted(INSTRUCT_WEIGHTS)}")


def conversation(pairs, images: int = 1) -> list:
    """LLaVA conversation; the first `images` user turns start with an image placeholder."""
    out = []
    for k, (q, a) in enumerate(pairs):
        out.append({"from": "human", "value": ("<image>\n" if k < images else "") + q})
        out.append({"from": "gpt", "value": a})
    return out


def fewshot_episode(scenes, index: int, k: int, rng, world: World = World(), stats=None,
                    kind: str | None = None) -> dict:
    """k demonstrations (other scenes of the split, with their answers) then the query about
    scene `index`, one image per turn. Count episodes answer with digits or with words
    (`style`), the same in every turn, so the answer's form is learnt from the context."""
    kind = kind or FEWSHOT_KINDS[int(rng.integers(len(FEWSHOT_KINDS)))]
    others = [(index + j) % len(scenes) for j in range(1, len(scenes))]
    if len(others) < k:
        raise ValueError(f"a {k}-shot episode needs {k + 1} scenes, the split has "
                         f"{len(scenes)}")
    order, qas = [], []
    for i in others + [index]:
        if len(order) == k and i != index:
            continue
        qa = question(kind, scenes[i], rng, world, stats)
        if qa is not None:
            order.append(i)
            qas.append(qa)
    if len(order) < k + 1:  # too few scenes where the kind applies: count instead
        return fewshot_episode(scenes, index, k, rng, world, stats, "count")
    style = ("digit", "word")[int(rng.integers(2))] if kind == "count" else "plain"
    pairs = []
    for qa in qas:
        answer = qa["answer"]
        if style == "word":
            answer = NUMBER_WORDS[int(answer)] if answer != "0" else "zero"
        pairs.append((qa["question"], answer))
    return dict(images=[scenes[i].id for i in order], conversations=conversation(pairs, len(pairs)),
                kind=kind, style=style, answer=pairs[-1][1])
