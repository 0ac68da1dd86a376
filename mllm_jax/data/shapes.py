"""The "shapes world": a procedural image-text data set small enough to learn in minutes.

A scene is 1-4 coloured shapes on a dark background, one object per cell of a coarse grid
(3x3: "top left" ... "center" ... "bottom right"), each small or large. An object, for
CHAIR and POPE, is a colour-shape pair ("red circle"); "ball" / "disc" name circles, "box" /
"block" squares, "plus" crosses (`chair_synonyms`).

Statistics. Objects have a Zipf-like popularity (so POPE's "popular" negatives differ from
random ones), and every object has a companion (red circle <-> blue square, ...): a scene that
holds an object holds its companion much more often than chance (`World.companion_rate`).
Training captions mention an absent companion of a present object in a fraction of the scenes
(`World.hallucination_rate`, training split only): the seed of object hallucination, which
preference pairs (faithful caption chosen, caption with an added absent companion rejected)
then teach away.

Everything is a pure function of (seed, split, index): scene i of a split is the same whatever
the split's size, and splits draw from disjoint seed streams. Text is lowercase; counts are
answered with digits, captions spell numbers out.

    scenes = make_split("train", 1000, seed=0)
    paths = write_dataset("shapes_data", {"train": 1000, "val": 100}, seed=0)
    tok = load_tokenizer(paths["tokenizer"])
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
import zlib

import numpy as np
from PIL import Image, ImageDraw

from mllm_jax.eval.chair import ChairEvaluator, pluralize
from mllm_jax.eval.pope import parse_yes_no

SHAPES = ("circle", "square", "triangle", "cross")
# Colour pairs (k, k + 3) are companions: red-blue, green-purple, yellow-white.
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "yellow": (235, 215, 40),
           "blue": (50, 90, 235), "purple": (165, 60, 205), "white": (240, 240, 240)}
SHAPE_SYNONYMS = {"circle": ("ball", "disc"), "square": ("box", "block"), "triangle": (),
                  "cross": ("plus",)}
SIZES = ("small", "large")
SPLITS = {"train": 0, "val": 1, "test": 2}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CELL_NAMES = {
    2: {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"},
    3: {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left",
        (1, 1): "center", (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom",
        (2, 2): "bottom right"},
}
POPE_MODES = ("random", "popular", "adversarial")

CAPTION_PROMPT = "describe the image briefly."
DETAIL_PROMPT = "describe the image in detail."
# Question kinds of the instruction mixture and their weights.
INSTRUCT_WEIGHTS = {"existence": 3, "count": 2, "colour": 2, "position": 1, "box": 1,
                    "what_at": 1, "cot_count": 1, "detail": 1, "caption": 1}
VQA_KINDS = ("existence", "count", "colour", "position", "box", "what_at", "cot_count")
FEWSHOT_KINDS = ("count", "colour", "existence")

# Purposes of the per-scene random streams (so adding one kind of text changes no other).
(_SCENE, _CAPTION, _INSTRUCT, _PREFERENCE, _EVAL, _HALLUCINATION, _FEWSHOT,
 _YESNO_PREFERENCE) = range(8)


@dataclasses.dataclass(frozen=True)
class World:
    """The world's rules. Sizes are fractions of a grid cell's side."""
    image_size: int = 32
    grid: int = 3
    shapes: tuple = SHAPES
    colours: tuple = tuple(COLOURS)
    min_objects: int = 1
    max_objects: int = 4
    small: float = 0.55
    large: float = 0.9
    jitter: float = 1.0  # objects move within their cell over this fraction of the free space
    popularity_exponent: float = 0.5  # object k (in popularity order) has weight (k+1)^-e
    companion_rate: float = 0.6  # chance that an added object is a missing companion
    hallucination_rate: float = 0.15  # training captions naming an absent companion
    synonym_rate: float = 0.1  # training captions naming a shape by a synonym
    # "no" existence questions (instructions, DPO pairs) asking for a `confusable_negative`
    confusable_rate: float = 0.0
    textures: bool = False  # objects are "plain" or "striped"
    background: tuple = (10, 50)  # grey level range of the background

    def __post_init__(self):
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"World.colours: unknown colours {unknown}; known: {list(COLOURS)}")
        unknown = [s for s in self.shapes if s not in SHAPE_SYNONYMS]
        if unknown:
            raise ValueError(f"World.shapes: unknown shapes {unknown}; known: {SHAPES}")
        if self.grid not in CELL_NAMES:
            raise ValueError(f"World.grid must be one of {sorted(CELL_NAMES)}, got {self.grid}")
        if not 1 <= self.min_objects <= self.max_objects <= min(self.grid ** 2 - 1, 9):
            raise ValueError(f"World objects per scene {self.min_objects}..{self.max_objects}: "
                             f"need 1 <= min <= max < grid*grid ({self.grid ** 2})")
        if self.image_size < 8 * self.grid:
            raise ValueError(f"World.image_size {self.image_size} is too small for a "
                             f"{self.grid}x{self.grid} grid (need >= {8 * self.grid})")
        if len(self.objects) < 2:
            raise ValueError("World needs at least two objects (colour-shape pairs)")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"World.jitter must be in [0, 1], got {self.jitter}")

    @functools.cached_property
    def objects(self) -> tuple:
        """The object vocabulary: "colour shape" names, shape-major."""
        return tuple(f"{c} {s}" for s in self.shapes for c in self.colours)

    @functools.cached_property
    def companions(self) -> dict:
        """Object -> its companion (a symmetric pairing: circle-square and triangle-cross,
        with the paired colour)."""
        nc, ns = len(self.colours), len(self.shapes)
        out = {}
        for si, s in enumerate(self.shapes):
            for ci, c in enumerate(self.colours):
                sj = si ^ 1 if (si ^ 1) < ns else si
                cj = (ci + nc // 2) % nc if nc % 2 == 0 or ci != nc - 1 else ci
                if (sj, cj) == (si, ci):
                    cj = (ci + 1) % nc
                out[f"{c} {s}"] = f"{self.colours[cj]} {self.shapes[sj]}"
        return out

    @functools.cached_property
    def popularity(self) -> np.ndarray:
        """Probability of drawing each object (aligned with `objects`)."""
        order = np.random.default_rng(1234).permutation(len(self.objects))
        w = np.empty(len(self.objects))
        w[order] = (np.arange(len(self.objects)) + 1.0) ** -self.popularity_exponent
        return w / w.sum()

    def cell_name(self, cell) -> str:
        return CELL_NAMES[self.grid][tuple(cell)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(objects=list(self.objects), companions=self.companions,
                 popularity=dict(zip(self.objects, map(float, self.popularity))),
                 synonyms=chair_synonyms(self))
        return d


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object; `bbox` is (x0, y0, x1, y1) in pixels, end exclusive (None for an object
    that is only mentioned, never drawn)."""
    shape: str
    colour: str
    size: str
    cell: tuple
    bbox: tuple | None
    texture: str = "plain"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    id: str
    objects: tuple  # of ShapeObject, in cell order (row-major)
    background: int
    image: np.ndarray  # uint8 [H, W, 3]

    @property
    def names(self) -> list:
        return [o.name for o in self.objects]


def split_code(name: str) -> int:
    """The seed-stream code of a split: 0, 1, 2 for train, val, test, else from its name."""
    return SPLITS.get(name, 1000 + zlib.crc32(name.encode()))


def scene_rng(seed, split, index, purpose):
    return np.random.default_rng([int(seed), split_code(split), int(index), purpose])


# ---- scenes and rendering ----------------------------------------------------------------
def _edges(world):
    return [round(k * world.image_size / world.grid) for k in range(world.grid + 1)]


def _offset(rng, free: int, jitter: float) -> int:
    """An object's offset in its cell, given `free` pixels to spare: uniform over them
    (jitter 1), over the middle `jitter` fraction of them, or centred (jitter 0)."""
    if jitter >= 1:
        return int(rng.integers(0, free + 1))
    lo = int(round(free * (1 - jitter) / 2))
    return lo + int(rng.integers(0, free - 2 * lo + 1))


def generate_scene(rng: np.random.Generator, world: World = World(), scene_id: str = "") -> Scene:
    """A random scene drawn with `rng`, rendered."""
    names = world.objects
    n = int(rng.integers(world.min_objects, world.max_objects + 1))
    chosen = [int(rng.choice(len(names), p=world.popularity))]
    index = {name: k for k, name in enumerate(names)}
    while len(chosen) < n:
        present = {names[k] for k in chosen}
        missing = sorted({world.companions[names[k]] for k in chosen} - present)
        if missing and rng.random() < world.companion_rate:
            chosen.append(index[missing[int(rng.integers(len(missing)))]])
        else:
            chosen.append(int(rng.choice(len(names), p=world.popularity)))
    cells = sorted(int(c) for c in rng.permutation(world.grid ** 2)[:n])
    order = rng.permutation(n)  # which object goes to which cell
    edges = _edges(world)
    min_cell = min(b - a for a, b in zip(edges, edges[1:]))
    objects = []
    for cell, k in zip(cells, order):
        r, c = divmod(cell, world.grid)
        size = SIZES[int(rng.integers(2))]
        side = max(3, int((world.large if size == "large" else world.small) * min_cell))
        x0 = edges[c] + _offset(rng, edges[c + 1] - edges[c] - side, world.jitter)
        y0 = edges[r] + _offset(rng, edges[r + 1] - edges[r] - side, world.jitter)
        texture = ("plain", "striped")[int(rng.integers(2))] if world.textures else "plain"
        colour, shape = names[chosen[k]].split(" ")
        objects.append(ShapeObject(shape, colour, size, (r, c), (x0, y0, x0 + side, y0 + side),
                                   texture))
    background = int(rng.integers(world.background[0], world.background[1] + 1))
    return Scene(scene_id, tuple(objects), background, render(objects, background, world))


def render(objects, background: int, world: World = World()) -> np.ndarray:
    """uint8 [H, W, 3] image of the objects on a grey background."""
    size = world.image_size
    image = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        fill = COLOURS[o.colour]
        box = [x0, y0, x1 - 1, y1 - 1]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
        elif o.shape == "cross":
            t = max(1, (x1 - x0) // 3)
            a = x0 + (x1 - x0 - t) // 2
            b = y0 + (y1 - y0 - t) // 2
            draw.rectangle([a, y0, a + t - 1, y1 - 1], fill=fill)
            draw.rectangle([x0, b, x1 - 1, b + t - 1], fill=fill)
    pixels = np.array(image)
    for o in objects:
        if o.texture == "striped":
            x0, y0, x1, y1 = o.bbox
            patch = pixels[y0 + 1:y1:2, x0:x1]
            mask = np.all(patch == COLOURS[o.colour], axis=-1)
            patch[mask] = (np.asarray(COLOURS[o.colour]) * 0.55).astype(np.uint8)
    return pixels


def make_split(name: str, n: int, seed: int = 0, world: World = World()) -> list:
    """Scenes 0..n-1 of split `name` ("train", "val", "test" or any name)."""
    return [generate_scene(scene_rng(seed, name, i, _SCENE), world, f"{name}-{i:06d}")
            for i in range(n)]


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
    return f"is there {_a(name)} in the image?"


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


# ---- text --------------------------------------------------------------------------------
def _a(phrase: str) -> str:
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
    return _a(f"{_adjectives(o, size)} {noun or o.shape}")


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
        parts.append(_a(f"{adj} {nouns[0]}") if n == 1
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
    rng = scene_rng(seed, split, index, _HALLUCINATION)
    if rng.random() >= world.hallucination_rate:
        return None
    present = set(scene.names)
    missing = sorted({world.companions[n] for n in present} - present)
    return missing[int(rng.integers(len(missing)))] if missing else None


def box_text(bbox, world: World = World()) -> str:
    """Pixel box -> "[x0, y0, x1, y1]" in 0-100 of the image side."""
    return "[" + ", ".join(str(round(100 * v / world.image_size)) for v in bbox) + "]"


def parse_box(text: str):
    """The first "[a, b, c, d]" in text as four floats, or None."""
    m = re.search(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
                  r"\s*(-?\d+(?:\.\d+)?)\s*\]", text)
    return tuple(float(v) for v in m.groups()) if m else None


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def count_cot(scene: Scene, shape: str) -> str:
    """Counting with a short rationale ending in "answer: N"."""
    objs = [o for o in _cell_order(scene.objects) if o.shape == shape]
    n = len(objs)
    listing = _join([object_phrase(o, size=False) for o in objs]) if objs \
        else f"no {pluralize(shape)}"
    noun = shape if n == 1 else pluralize(shape)
    return f"i see {listing}. that makes {n} {noun}. answer: {n}"


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


# ---- CHAIR and answer checking -----------------------------------------------------------
def chair_synonyms(world: World = World()) -> dict:
    """Canonical object -> surface forms, for `ChairEvaluator(synonyms=...)`."""
    return {f"{c} {s}": [f"{c} {w}" for w in SHAPE_SYNONYMS[s]]
            for s in world.shapes for c in world.colours}


@functools.lru_cache(maxsize=8)
def chair_evaluator(world: World = World()) -> ChairEvaluator:
    return ChairEvaluator(synonyms=chair_synonyms(world))


def mentioned_objects(text: str, world: World = World()) -> list:
    """Canonical objects ("red circle") mentioned in `text`, in order, with multiplicity."""
    return chair_evaluator(world).mentioned_objects(text)


def chair_scores(captions: dict, gt_objects: dict, world: World = World()) -> dict:
    """CHAIR_i / CHAIR_s of generated captions (id -> text) against the objects of each scene
    (id -> names); see `ChairEvaluator.chair`."""
    return chair_evaluator(world).chair(captions, gt_objects)


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def _number(text):
    lower = text.lower()
    if "answer:" in lower:
        lower = lower.rsplit("answer:", 1)[1]
    for w in _words(lower):
        if w.isdigit():
            return int(w)
        if w in NUMBER_WORDS or w == "zero":
            return 0 if w in ("zero", "no") else NUMBER_WORDS.index(w)
    return None


def answer_correct(entry: dict, prediction: str, world: World = World()) -> bool:
    """Whether a model's answer to an eval entry (of `eval_{split}.json`) is right."""
    kind, answer = entry["kind"], entry["answer"]
    if kind in ("existence", "pope"):
        return parse_yes_no(prediction) == answer
    if kind == "count":
        return _number(prediction) == int(answer)
    if kind == "cot_count":
        return _number(prediction) == int(entry["count"])
    if kind == "colour":
        found = [w for w in _words(prediction) if w in world.colours]
        return bool(found) and found[0] == answer
    if kind == "position":
        words = [w for w in _words(prediction) if w not in ("the", "at", "in", "is", "it")]
        return " ".join(words) == answer
    if kind == "box":
        box = parse_box(prediction)
        return box is not None and box_iou(box, parse_box(answer)) >= 0.5
    if kind == "what_at":
        return entry["object"] in mentioned_objects(prediction, world)[:1]
    if kind == "fewshot":
        return _words(prediction) == _words(answer)
    raise ValueError(f"eval kind {kind!r} has no single right answer (score captions with "
                     f"CIDEr / chair_scores)")


def accuracy_by_kind(entries, predictions, world: World = World()) -> dict:
    """{kind: accuracy} over the scored kinds (POPE by mode as "pope_<mode>")."""
    hits = {}
    for e, p in zip(entries, predictions):
        if e["kind"] in ("caption", "detail"):
            continue
        key = f"pope_{e['pope_mode']}" if e["kind"] == "pope" else e["kind"]
        hits.setdefault(key, []).append(answer_correct(e, p, world))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


# ---- records -----------------------------------------------------------------------------
def image_path(scene_id: str) -> str:
    """Where a scene's PNG goes under the data directory: images/{split}/{index}.png."""
    split, index = scene_id.rsplit("-", 1)
    return f"images/{split}/{index}.png"


def caption_record(scene, seed, split, index, world=World()) -> dict:
    """Stage 1: the short caption (with the scene's hallucinated companion, if any)."""
    rng = scene_rng(seed, split, index, _CAPTION)
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
    rng = scene_rng(seed, split, index, _INSTRUCT)
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
    rng = scene_rng(seed, split, index, _PREFERENCE)
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
    rng = scene_rng(seed, split, index, _YESNO_PREFERENCE)
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
        rng = scene_rng(seed, split, index, _EVAL)
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
                                 scene_rng(seed, split, index, _FEWSHOT), world, stats)
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


def _dump(obj, path):
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # the C encoder
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_dataset(out_dir, sizes=None, seed: int = 0, world: World = World(), *,
                  turns: int = 3, weights: dict | None = None, fewshot_fraction: float = 0.05,
                  fewshot_k: int = 2, tokenizer_vocab_size: int | None = 512) -> dict:
    """Writes the world under `out_dir`: images/{split}/NNNNNN.png and, per split,
    captions_{split}.json (stage 1), instruct_{split}.json (stage 2: `turns` questions a
    record, of kinds drawn by `weights` (default INSTRUCT_WEIGHTS), plus few-shot episodes for
    `fewshot_fraction` of the scenes), preference_{split}.json (DPO on detailed captions),
    preference_yesno_{split}.json (DPO on existence questions), pairs_{split}.json
    ({id, image, caption, regions}: the faithful short caption and each object's box and
    phrase, for contrastive pre-training), eval_{split}.json (every split but train); text_corpus.txt
    (from the train split, else the first), world.json, and a tokenizer trained on the
    corpus in tokenizer/ (unless `tokenizer_vocab_size` is None). POPE statistics are those of
    the split itself. Returns {name: path}."""
    sizes = dict(sizes or {"train": 10000, "val": 500, "test": 500})
    out_dir = os.fspath(out_dir)
    paths = {}
    corpus_split = "train" if "train" in sizes else next(iter(sizes))
    for split, n in sizes.items():
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        scenes = make_split(split, n, seed, world)
        stats = statistics(scenes, world)
        for scene in scenes:
            Image.fromarray(scene.image).save(os.path.join(out_dir, image_path(scene.id)))
        captions, instruct, prefs, yesno, pairs = [], [], [], [], []
        for i, scene in enumerate(scenes):
            captions.append(caption_record(scene, seed, split, i, world))
            yesno.append(yesno_preference_record(scene, seed, split, i, world, stats))
            instruct.append(instruct_record(scene, seed, split, i, world, stats, turns,
                                            weights))
            pref = preference_record(scene, seed, split, i, world, stats)
            if pref is not None:
                prefs.append(pref)
            pairs.append({"id": scene.id, "image": image_path(scene.id),
                          "caption": short_caption(scene.objects, None, world),
                          "regions": [{"box": list(o.bbox), "phrase": object_phrase(o)}
                                      for o in scene.objects]})
            rng = scene_rng(seed, split, i, _FEWSHOT)
            if len(scenes) > fewshot_k and rng.random() < fewshot_fraction:
                ep = fewshot_episode(scenes, i, fewshot_k, rng, world, stats)
                instruct.append({"id": f"{scene.id}-fewshot",
                                 "image": [image_path(s) for s in ep["images"]],
                                 "conversations": ep["conversations"], "kinds": ["fewshot"],
                                 "hallucinated": []})
        files = {"captions": captions, "instruct": instruct, "preference": prefs,
                 "preference_yesno": yesno, "pairs": pairs}
        if split != "train":
            files["eval"] = eval_records(scenes, seed, split, world, stats, fewshot_k)
        for name, data in files.items():
            paths[f"{name}_{split}"] = os.path.join(out_dir, f"{name}_{split}.json")
            _dump(data, paths[f"{name}_{split}"])
        if split == corpus_split:
            paths["text_corpus"] = os.path.join(out_dir, "text_corpus.txt")
            with open(paths["text_corpus"], "w", encoding="utf-8") as f:
                f.write("\n".join(corpus_lines(scenes, seed, split, world, stats)) + "\n")
    paths["world"] = os.path.join(out_dir, "world.json")
    _dump({"seed": seed, "sizes": sizes, **world.to_dict()}, paths["world"])
    if tokenizer_vocab_size:
        paths["tokenizer"] = train_tokenizer(paths["text_corpus"],
                                             os.path.join(out_dir, "tokenizer"),
                                             vocab_size=tokenizer_vocab_size)
    return paths


def read_pairs(path, image_root=None, *, regions: bool = False) -> list:
    """(image path, caption) pairs of a pairs_{split}.json file; paths joined to
    `image_root` (default: the file's directory). With `regions`, (image path, caption,
    regions) triples, regions a list of ((x0, y0, x1, y1) box in pixels, phrase)."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    out = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) \
                or not isinstance(e.get("caption"), str):
            raise ValueError(f"{path}: entry {k} is not {{id, image: str, caption: str}}")
        item = (os.path.join(root, e["image"]), e["caption"])
        if regions:
            if not isinstance(e.get("regions"), list):
                raise ValueError(f"{path}: entry {k} ({e.get('id')}) has no regions list; "
                                 f"rebuild the data with shapes.write_dataset")
            try:
                item += ([(tuple(int(v) for v in r["box"]), str(r["phrase"]))
                          for r in e["regions"]],)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: entry {k} ({e.get('id')}): a region is not "
                                 f"{{box: [x0, y0, x1, y1], phrase}}: {err}") from err
        out.append(item)
    return out


# ---- tokenizer ---------------------------------------------------------------------------
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
IMAGE_TOKEN = "<image>"


def train_tokenizer(corpus_path, out_dir, vocab_size: int = 512) -> str:
    """Trains a SentencePiece BPE model on the corpus (LLaMA-style: byte fallback, digits
    split, no normalization, dummy prefix; ids <unk> 0, <s> 1, </s> 2, <pad> 3, <image> 4),
    deterministically (one thread, no sampling or shuffling). Writes tokenizer.model and
    tokenizer_config.json / special_tokens_map.json into `out_dir` (a checkpoint tokenizer
    `load_tokenizer(out_dir)` reads) and returns `out_dir`."""
    import sentencepiece as spm

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=os.fspath(corpus_path), model_prefix=os.path.join(out_dir, "tokenizer"),
            vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            user_defined_symbols=[IMAGE_TOKEN], num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=1 << 14, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"training a {vocab_size}-piece tokenizer on {corpus_path} failed "
                         f"(with byte fallback the vocabulary needs 256 bytes + the corpus's "
                         f"characters + 5 specials): {e}") from e
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    _drop_paths(os.path.join(out_dir, "tokenizer.model"))
    specials = {f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}
    _dump({**specials, "image_token": IMAGE_TOKEN, "legacy": False, "add_bos_token": True,
           "add_eos_token": False, "tokenizer_class": "LlamaTokenizer",
           "additional_special_tokens": [IMAGE_TOKEN]},
          os.path.join(out_dir, "tokenizer_config.json"))
    _dump({**specials, "additional_special_tokens": [IMAGE_TOKEN]},
          os.path.join(out_dir, "special_tokens_map.json"))
    return out_dir


def _drop_paths(model_file):
    """Keeps only file names in the model's training spec, so the same corpus gives the same
    bytes wherever it is trained."""
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.trainer_spec
    spec.input[:] = [os.path.basename(p) for p in spec.input]
    spec.model_prefix = os.path.basename(spec.model_prefix)
    with open(model_file, "wb") as f:
        f.write(proto.SerializeToString())


# ---- out-of-world images -----------------------------------------------------------------
def out_of_world_images(size: int = 32) -> list:
    """Real photographs as (name, uint8 [size, size, 3]) pairs, centre-cropped and resized:
    scikit-image's astronaut, coffee and chelsea, or scikit-learn's sample images. Empty
    (with a warning naming the packages) when neither library is installed."""
    photos = []
    try:
        from skimage import data as skdata
        photos = [(n, getattr(skdata, n)()) for n in ("astronaut", "coffee", "chelsea")]
    except ImportError:
        try:
            from sklearn.datasets import load_sample_images
            bunch = load_sample_images()
            photos = [(os.path.splitext(os.path.basename(f))[0], img)
                      for f, img in zip(bunch.filenames, bunch.images)]
        except ImportError:
            warnings.warn("out_of_world_images: no photographs available; install "
                          "scikit-image (or scikit-learn) to get them", stacklevel=2)
            return []
    out = []
    for name, img in photos:
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
        pil = Image.fromarray(np.asarray(crop, np.uint8)).resize((size, size), Image.BICUBIC)
        out.append((name, np.asarray(pil)))
    return out
