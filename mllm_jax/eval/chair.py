"""CHAIR object-hallucination metric (Rohrbach et al., EMNLP 2018).

Mirrors ``utils/chair.py`` of https://github.com/LisaAnne/Hallucination:

* every mention of a vocabulary object in a caption is mapped to its canonical
  ("node") word through a synonym table;
* ground truth per image = canonical objects from segmentation annotations
  plus canonical objects mentioned in the ground-truth captions (see
  :meth:`ChairEvaluator.ground_truth`);
* ``CHAIR_i = #hallucinated mentions / #mentions`` (mentions are counted with
  multiplicity, exactly like the official ``coco_word_count``);
* ``CHAIR_s = #captions with >= 1 hallucinated mention / #captions``.

Simplifications vs. the official script (documented on purpose):

* no NLTK / ``pattern.en``: captions are lowercased and split into
  alphanumeric tokens (so ``hot-dog`` == ``hot dog``), and plurals are handled
  by *generating* plural surface forms of every synonym (regular rules +
  an irregular table, see :func:`pluralize`) instead of singularizing the
  caption with ``pattern.en.singularize``;
* instead of the hard-coded two-word dictionary, synonyms of any length are
  matched greedily, longest first (so ``hot dog`` wins over ``dog``,
  ``teddy bear`` over ``bear``, ``dining table`` and ``table`` both map to
  ``dining table``).  The official qualifier rules are kept as extra
  multi-word forms: ``baby/adult <animal>`` -> animal, ``passenger jet/train``
  -> the vehicle (not ``person``), ``bow tie`` -> ``tie``, ``toilet seat`` ->
  ``toilet``, and "seat" is ignored when "toilet" also appears;
* :data:`COCO_SYNONYMS` is a hand-written table covering all 80 COCO
  categories with the most common synonyms of the official ``synonyms.txt``,
  not the complete list (some rare synonyms are missing).

A custom vocabulary (e.g. a synthetic world's objects) is passed as
``ChairEvaluator(synonyms={canonical: [surface forms...]})``; the canonical
name itself is always a surface form.
"""

from __future__ import annotations

import re
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

__all__ = ["COCO_SYNONYMS", "pluralize", "ChairEvaluator"]

# canonical COCO category -> surface forms (subset of LisaAnne/Hallucination data/synonyms.txt).
COCO_SYNONYMS: Dict[str, List[str]] = {
    "person": ["girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult",
               "rider", "children", "baby", "worker", "passenger", "sister", "biker", "policeman",
               "cop", "officer", "lady", "cowboy", "bride", "groom", "male", "female", "guy",
               "traveler", "mother", "father", "gentleman", "pitcher", "player", "skier",
               "snowboarder", "skater", "skateboarder", "surfer", "person", "batter", "catcher",
               "umpire", "tourist", "pedestrian", "spectator", "toddler", "teenager", "teen",
               "student", "customer", "soldier", "driver", "daughter", "son", "brother", "wife",
               "husband", "friend", "infant", "cyclist"],
    "bicycle": ["bike", "bicycle", "cycle", "unicycle", "tricycle"],
    "car": ["automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe",
            "taxicab", "limo", "taxi"],
    "motorcycle": ["motorcycle", "motor bike", "motor cycle", "motorbike", "scooter", "moped"],
    "airplane": ["jetliner", "plane", "air plane", "airplane", "monoplane", "aircraft", "jet",
                 "airbus", "biplane", "seaplane", "airliner"],
    "bus": ["minibus", "trolley", "bus"],
    "train": ["locomotive", "tramway", "caboose", "train"],
    "truck": ["pickup", "lorry", "hauler", "firetruck", "truck"],
    "boat": ["ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat",
             "canoe", "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel",
             "rowboat", "trawler", "ferry", "watercraft", "tugboat", "schooner", "barge",
             "ferryboat", "steamboat", "boat"],
    "traffic light": ["traffic signal", "stop light", "traffic light", "street light"],
    "fire hydrant": ["hydrant", "fire hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["meter", "parking meter"],
    "bench": ["pew", "bench"],
    "bird": ["ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin",
             "pelican", "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon",
             "sparrow", "seabird", "osprey", "blackbird", "fowl", "shorebird", "woodpecker",
             "egret", "chickadee", "quail", "bluebird", "kingfisher", "buzzard", "willet",
             "gull", "swan", "bluejay", "flamingo", "cormorant", "parrot", "loon", "gosling",
             "waterbird", "pheasant", "rooster", "sandpiper", "crow", "raven", "turkey", "oriole",
             "cowbird", "warbler", "magpie", "peacock", "cockatiel", "lorikeet", "puffin",
             "vulture", "condor", "macaw", "peafowl", "cockatoo", "songbird", "bird"],
    "cat": ["kitten", "feline", "tabby", "cat"],
    "dog": ["puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler",
            "canine", "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie",
            "doberman", "mutt", "doggy", "spaniel", "bulldog", "sheepdog", "weimaraner",
            "corgi", "cocker", "greyhound", "retriever", "brindle", "hound", "whippet", "husky",
            "dog"],
    "horse": ["colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino",
              "mustang", "clydesdale", "bronc", "bronco", "horse"],
    "sheep": ["lamb", "ram", "goat", "ewe", "sheep"],
    "cow": ["cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu",
            "bison", "cow"],
    "elephant": ["elephant"],
    "bear": ["grizzly", "bear"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack", "knapsack"],
    "umbrella": ["umbrella"],
    "handbag": ["handbag", "wallet", "purse", "briefcase"],
    "tie": ["tie", "bow", "bow tie"],
    "suitcase": ["suitcase", "suit case", "luggage"],
    "frisbee": ["frisbee"],
    "skis": ["ski", "skis"],
    "snowboard": ["snowboard"],
    "sports ball": ["sports ball", "ball"],
    "kite": ["kite"],
    "baseball bat": ["baseball bat"],
    "baseball glove": ["baseball glove", "mitt"],
    "skateboard": ["skateboard"],
    "surfboard": ["surfboard", "longboard", "skimboard", "shortboard", "wakeboard"],
    "tennis racket": ["tennis racket", "racket"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass"],
    "cup": ["cup"],
    "fork": ["fork"],
    "knife": ["knife", "pocketknife", "knives"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich", "burger", "sub", "cheeseburger", "hamburger"],
    "orange": ["orange"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake", "cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"],
    "chair": ["chair", "seat", "stool"],
    "couch": ["sofa", "couch"],
    "potted plant": ["houseplant", "potted plant"],
    "bed": ["bed"],
    "dining table": ["table", "dining table", "desk"],
    "toilet": ["toilet", "urinal", "commode", "lavatory", "potty"],
    "tv": ["tv", "monitor", "televison", "television"],
    "laptop": ["computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer",
               "laptop"],
    "mouse": ["mouse"],
    "remote": ["remote"],
    "keyboard": ["keyboard"],
    "cell phone": ["mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone",
                   "iphone", "cell phone"],
    "microwave": ["microwave"],
    "oven": ["stovetop", "stove", "stove top oven", "range", "oven"],
    "toaster": ["toaster"],
    "sink": ["sink"],
    "refrigerator": ["fridge", "refrigerator"],
    "book": ["book", "novel"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddybear", "teddy bear"],
    "hair drier": ["hairdryer", "hair drier", "hair dryer", "blow dryer", "blowdryer",
                   "blow drier", "blowdrier", "dryer", "drier"],
    "toothbrush": ["toothbrush"],
}

# Qualifier rules from the official script: these phrases map to the given canonical
# object (or to None = "not an object mention"), overriding a shorter match.
_COCO_EXTRA_PHRASES: Dict[str, str] = {}
for _a in ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
           "giraffe", "cub"]:
    if _a in COCO_SYNONYMS:
        for _q in ("baby", "adult"):
            _COCO_EXTRA_PHRASES[f"{_q} {_a}"] = _a
for _v, _canon in (("jet", "airplane"), ("train", "train")):
    _COCO_EXTRA_PHRASES[f"passenger {_v}"] = _canon
_COCO_EXTRA_PHRASES["toilet seat"] = "toilet"

_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "ox": "oxen", "knife": "knives",
    "wife": "wives", "leaf": "leaves", "shelf": "shelves", "calf": "calves", "wolf": "wolves",
    "half": "halves", "loaf": "loaves", "policeman": "policemen", "gentleman": "gentlemen",
    "fireman": "firemen", "cowboy": "cowboys",
}
_INVARIANT = {"sheep", "people", "children", "cattle", "oxen", "scissors", "skis", "luggage",
              "broccoli", "fish", "deer", "bison", "series", "species", "men", "women", "knives"}


def pluralize(word: str) -> str:
    """Plural of a single English noun (regular rules + small irregular table)."""
    w = word.lower()
    if w in _INVARIANT:
        return w
    if w in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[w]
    for sing, plur in _IRREGULAR_PLURALS.items():  # compounds: "policewoman" -> "policewomen"
        if w.endswith(sing) and len(w) > len(sing) and sing in ("man", "woman"):
            return w[: -len(sing)] + plur
    if re.search(r"(s|x|z|ch|sh)$", w):
        return w + "es"
    if re.search(r"[^aeiou]y$", w):
        return w[:-1] + "ies"
    return w + "s"


def _tokens(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class ChairEvaluator:
    """CHAIR_i / CHAIR_s over an object vocabulary.

    Args:
      synonyms: canonical object -> list of surface forms (single or multi-word).
        Defaults to :data:`COCO_SYNONYMS` (+ the official COCO qualifier rules).
      extra_phrases: phrase -> canonical object, matched with priority over a
        shorter synonym (e.g. ``{"baby bird": "bird"}``).  Defaults to the COCO
        rules when ``synonyms`` is None, else empty.
      add_plurals: also match the plural of every surface form (last word
        pluralized).
    """

    def __init__(self, synonyms: Optional[Mapping[str, Iterable[str]]] = None,
                 extra_phrases: Optional[Mapping[str, str]] = None,
                 add_plurals: bool = True):
        use_coco = synonyms is None
        if use_coco:
            synonyms = COCO_SYNONYMS
            if extra_phrases is None:
                extra_phrases = _COCO_EXTRA_PHRASES
        self.coco_rules = use_coco
        self.objects: List[str] = list(synonyms.keys())
        # surface token tuple -> canonical
        self.surface: Dict[Tuple[str, ...], str] = {}

        def add(form: str, canon: str, override: bool = False):
            toks = tuple(_tokens(form))
            if not toks:
                return
            forms = [toks]
            if add_plurals:
                forms.append(toks[:-1] + (pluralize(toks[-1]),))
            for f in forms:
                if override or f not in self.surface:
                    self.surface[f] = canon

        for canon, forms in synonyms.items():
            add(canon, canon)
            for f in forms:
                add(f, canon)
        for phrase, canon in (extra_phrases or {}).items():
            add(phrase, canon, override=True)
        self.max_len = max((len(k) for k in self.surface), default=1)

    def canonical(self, word: str) -> Optional[str]:
        """Canonical object for a surface form (``"men"`` -> ``"person"``), else None."""
        return self.surface.get(tuple(_tokens(word)))

    def mentions(self, caption: str) -> List[Tuple[str, str]]:
        """All object mentions as ``(surface phrase, canonical)`` in caption order,
        greedy longest match first, counted with multiplicity."""
        toks = _tokens(caption)
        found: List[Tuple[str, str]] = []
        i = 0
        while i < len(toks):
            for L in range(min(self.max_len, len(toks) - i), 0, -1):
                key = tuple(toks[i:i + L])
                if key in self.surface:
                    found.append((" ".join(key), self.surface[key]))
                    i += L
                    break
            else:
                i += 1
        if self.coco_rules:
            # Official rule: "toilet seat" is not a chair -- drop "seat" if "toilet" appears.
            if any(c == "toilet" for _, c in found):
                found = [(s, c) for s, c in found if not (c == "chair" and s in ("seat", "seats"))]
        return found

    def mentioned_objects(self, caption: str) -> List[str]:
        """Canonical objects mentioned in ``caption`` (with multiplicity, in order)."""
        return [c for _, c in self.mentions(caption)]

    def ground_truth(self, segmentation_objects: Optional[Iterable[str]] = None,
                     reference_captions: Optional[Sequence[str]] = None) -> Set[str]:
        """Official ground truth: canonical segmentation labels U objects mentioned in
        the reference captions.  Labels not in the vocabulary are kept as given."""
        gt: Set[str] = set()
        for o in segmentation_objects or ():
            gt.add(self.canonical(o) or o)
        for cap in reference_captions or ():
            gt.update(self.mentioned_objects(cap))
        return gt

    def chair(self, captions: Mapping[Hashable, str],
              gt_objects: Mapping[Hashable, Iterable[str]]) -> dict:
        """Compute CHAIR.

        Args:
          captions: id -> generated caption.
          gt_objects: id -> ground-truth objects (canonical names or any surface
            form; they are canonicalized).

        Returns:
          ``{"chair_i", "chair_s", "num_mentions", "num_hallucinated_mentions",
          "num_captions", "num_hallucinated_captions", "per_id"}``; ``per_id[id]``
          holds ``mentions`` [(surface, canonical)], ``hallucinated``
          [(surface, canonical)], ``gt_objects``, ``chair_i``, ``chair_s``.
          ``chair_i`` is 0.0 when there are no mentions at all.
        """
        n_caps = n_hal_caps = n_mentions = n_hal = 0
        per_id = {}
        for i, cap in captions.items():
            gt = {self.canonical(o) or o for o in gt_objects.get(i, ())}
            ments = self.mentions(cap)
            hal = [(s, c) for s, c in ments if c not in gt]
            n_caps += 1
            n_mentions += len(ments)
            n_hal += len(hal)
            n_hal_caps += int(bool(hal))
            per_id[i] = {
                "caption": cap,
                "mentions": ments,
                "hallucinated": hal,
                "gt_objects": sorted(gt),
                "chair_i": len(hal) / len(ments) if ments else 0.0,
                "chair_s": int(bool(hal)),
            }
        return {
            "chair_i": n_hal / n_mentions if n_mentions else 0.0,
            "chair_s": n_hal_caps / n_caps if n_caps else 0.0,
            "num_mentions": n_mentions,
            "num_hallucinated_mentions": n_hal,
            "num_captions": n_caps,
            "num_hallucinated_captions": n_hal_caps,
            "per_id": per_id,
        }
