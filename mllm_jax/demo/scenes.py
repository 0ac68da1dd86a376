"""The shapes world's scenes: its rules and vocabulary (`World`), the objects of a scene,
and sampling and rendering scenes.

A scene is 1-4 coloured shapes on a dark background, one object per cell of a coarse grid
(3x3: "top left" ... "center" ... "bottom right"), each small or large. An object, for
CHAIR and POPE, is a colour-shape pair ("red circle"); "ball" / "disc" name circles, "box" /
"block" squares, "plus" crosses (`chair_synonyms`).

Objects have a Zipf-like popularity (`World.popularity`), and every object has a companion
(red circle <-> blue square, ...): a scene that holds an object holds its companion much more
often than chance (`World.companion_rate`).

Everything is a pure function of (seed, split, index): scene i of a split is the same whatever
the split's size, splits draw from disjoint seed streams, and each kind of text made from a
scene draws from its own stream (`scene_rng` with a `STREAM_*` purpose).

    scenes = make_split("train", 1000, seed=0)
"""
from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
# Colour pairs (k, k + 3) are companions: red-blue, green-purple, yellow-white.
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "yellow": (235, 215, 40),
           "blue": (50, 90, 235), "purple": (165, 60, 205), "white": (240, 240, 240)}
SHAPE_SYNONYMS = {"circle": ("ball", "disc"), "square": ("box", "block"), "triangle": (),
                  "cross": ("plus",)}
SIZES = ("small", "large")
SPLITS = {"train": 0, "val": 1, "test": 2}
CELL_NAMES = {
    2: {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"},
    3: {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left",
        (1, 1): "center", (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom",
        (2, 2): "bottom right"},
}

# Purposes of the per-scene random streams (so adding one kind of text changes no other).
(STREAM_SCENE, STREAM_CAPTION, STREAM_INSTRUCT, STREAM_PREFERENCE, STREAM_EVAL,
 STREAM_HALLUCINATION, STREAM_FEWSHOT, STREAM_YESNO_PREFERENCE) = range(8)


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


def chair_synonyms(world: World = World()) -> dict:
    """Canonical object -> surface forms, for `ChairEvaluator(synonyms=...)`."""
    return {f"{c} {s}": [f"{c} {w}" for w in SHAPE_SYNONYMS[s]]
            for s in world.shapes for c in world.colours}


def image_path(scene_id: str) -> str:
    """Where a scene's PNG goes under the data directory: images/{split}/{index}.png."""
    split, index = scene_id.rsplit("-", 1)
    return f"images/{split}/{index}.png"


# ---- sampling and rendering --------------------------------------------------------------
def cell_edges(world):
    """The pixel edges of the grid's cells along a side (`grid` + 1 values)."""
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
    edges = cell_edges(world)
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
    return [generate_scene(scene_rng(seed, name, i, STREAM_SCENE), world, f"{name}-{i:06d}")
            for i in range(n)]
