"""Captions of scenes: noun phrases, short and detailed captions, box text, counting
rationales, and the absent companion a training caption may name.

Training captions mention an absent companion of a present object in a fraction of the scenes
(`World.hallucination_rate`, training split only): the seed of object hallucination, which
preference pairs (faithful caption chosen, caption with an added absent companion rejected)
then teach away. Text is lowercase; captions spell numbers out.
"""
from __future__ import annotations

from mllm_jax.demo.scenes import (SHAPE_SYNONYMS, SIZES, STREAM_HALLUCINATION, Scene,
                                  ShapeObject, World, scene_rng)
from mllm_jax.eval.chair import pluralize

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PROMPT = "describe the image briefly."
DETAIL_PROMPT = "describe the image in detail."


def with_article(phrase: str) -> str:
    """The phrase after "a" or "an" ("an orange ...", "a red circle")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(o, rng, world, synonyms: bool) -> str:
    alts = SHAPE_SYNONYMS[o.shape]
    if synonyms and alts and rng.random() < world.synonym_rate:
        return alts[int(rng.integers(len(alts)))]
    return o.shape


def _adjectives(o, size: bool) -> str:
    words = ([o.size] if size else []) + (["striped"] if o.texture == "striped" else [])
    return " ".join(words + [o.colour])


def object_phrase(o: ShapeObject, *, size: bool = True, noun: str | None = None) -> str:
    """"a large red circle"."""
    return with_article(f"{_adjectives(o, size)} {noun or o.shape}")


def _join(items) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cell_order(objects):
    return sorted(objects, key=lambda o: o.cell)


def short_caption(objects, rng=None, world: World = World(), style: int = 0) -> str:
    """"a red circle and two blue squares." (same colour, shape and texture are grouped);
    `style` 0-2 picks the sentence frame. With `rng`, shapes are sometimes named by a
    synonym."""
    groups = {}
    for o in _cell_order(objects):
        noun = _noun(o, rng, world, rng is not None)
        groups.setdefault((_adjectives(o, False), o.shape), []).append(noun)
    parts = []
    for (adj, _), nouns in groups.items():
        n = len(nouns)
        parts.append(with_article(f"{adj} {nouns[0]}") if n == 1
                     else f"{NUMBER_WORDS[n]} {adj} {pluralize(nouns[0])}")
    listing = _join(parts)
    if style == 1:
        first = next(iter(groups.values()))
        return f"there {'is' if len(first) == 1 else 'are'} {listing}."
    if style == 2:
        return f"a picture of {listing}."
    return f"{listing}."


def position_phrase(o, world) -> str:
    name = world.cell_name(o.cell)
    return "in the center" if name == "center" else f"at the {name}"


def detailed_caption(objects, rng=None, world: World = World()) -> str:
    """"there are two objects. a large red circle at the top left. a small blue square in the
    center." Objects in cell order."""
    n = len(objects)
    head = "there is one object." if n == 1 else f"there are {NUMBER_WORDS[n]} objects."
    parts = [head]
    for o in _cell_order(objects):
        noun = _noun(o, rng, world, rng is not None)
        parts.append(f"{object_phrase(o, noun=noun)} {position_phrase(o, world)}.")
    return " ".join(parts)


def with_extra_object(scene: Scene, name: str, rng, world: World = World()) -> tuple:
    """The scene's objects plus an undrawn `name` in a random free cell (None if no cell is
    free)."""
    used = {o.cell for o in scene.objects}
    free = [divmod(c, world.grid) for c in range(world.grid ** 2)
            if divmod(c, world.grid) not in used]
    if not free:
        return None
    colour, shape = name.split(" ")
    texture = ("plain", "striped")[int(rng.integers(2))] if world.textures else "plain"
    extra = ShapeObject(shape, colour, SIZES[int(rng.integers(2))],
                        free[int(rng.integers(len(free)))], None, texture)
    return scene.objects + (extra,)


def hallucinated_companion(scene: Scene, seed, split, index, world: World = World()):
    """The absent companion a training caption of this scene names, or None (most scenes;
    always None outside the training split)."""
    if split != "train" or world.hallucination_rate <= 0:
        return None
    rng = scene_rng(seed, split, index, STREAM_HALLUCINATION)
    if rng.random() >= world.hallucination_rate:
        return None
    present = set(scene.names)
    missing = sorted({world.companions[n] for n in present} - present)
    return missing[int(rng.integers(len(missing)))] if missing else None


def box_text(bbox, world: World = World()) -> str:
    """Pixel box -> "[x0, y0, x1, y1]" in 0-100 of the image side."""
    return "[" + ", ".join(str(round(100 * v / world.image_size)) for v in bbox) + "]"


def count_cot(scene: Scene, shape: str) -> str:
    """Counting with a short rationale ending in "answer: N"."""
    objs = [o for o in _cell_order(scene.objects) if o.shape == shape]
    n = len(objs)
    listing = _join([object_phrase(o, size=False) for o in objs]) if objs \
        else f"no {pluralize(shape)}"
    noun = shape if n == 1 else pluralize(shape)
    return f"i see {listing}. that makes {n} {noun}. answer: {n}"
