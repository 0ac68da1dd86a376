"""CHAIR object-hallucination metric (Rohrbach et al., EMNLP 2018).

Mirrors ``utils/chair.py`` and ``data/synonyms.txt`` of LisaAnne/Hallucination
(the basis of the CHAIR scripts used by later hallucination papers).
For the COCO vocabulary (``ChairEvaluator()``) a caption is processed exactly
as the official ``caption_to_words``:

1. lowercase, tokenize like ``nltk.word_tokenize`` (:func:`word_tokenize`),
   singularize every token like ``pattern.en.singularize``
   (:func:`singularize`);
2. merge "double words" scanning left to right (:data:`COCO_DOUBLE_WORDS`:
   ``hot dog``, ``teddy bear``, ``baby bird`` -> ``bird``,
   ``passenger jet`` -> ``jet``, ``bow tie`` -> ``tie``, ``toilet seat`` ->
   ``toilet``, ``wine glas`` -> ``wine glass``, ...);
3. drop ``seat`` when ``toilet`` is also present;
4. keep words found in the synonym table, map each to its category.

The table is the official ``synonyms.txt`` verbatim (:data:`COCO_SYNONYMS_TXT`),
parsed as the official code does (``line.strip().split(", ")``), so its quirks
are kept: `` motor bike`` and `` cheesecake`` carry a leading space and
``iPhone`` is capitalised, so none of them can match; ``bus`` singularizes to
``bu`` and is never counted (``buses`` is); ``glass`` becomes ``glas``.

Ground truth per image = categories of its instance annotations plus
categories mentioned in its reference captions (:meth:`ChairEvaluator.ground_truth`).
``CHAIR_i = #hallucinated mentions / #mentions`` and
``CHAIR_s = #captions with >= 1 hallucinated mention / #captions``.

A custom vocabulary (e.g. a synthetic world's objects) is passed as
``ChairEvaluator(synonyms={canonical: [surface forms...]})``; it is matched
greedily on alphanumeric tokens, longest phrase first, with generated plurals.
"""

from __future__ import annotations

import functools
import re
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

__all__ = ["COCO_SYNONYMS_TXT", "COCO_SYNONYMS", "COCO_DOUBLE_WORDS", "singularize",
           "word_tokenize", "merge_coco_words", "pluralize", "ChairEvaluator"]

# data/synonyms.txt of LisaAnne/Hallucination, verbatim (first entry = category).
COCO_SYNONYMS_TXT = """person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison 
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield 
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""


def _parse_synonyms(text: str) -> List[List[str]]:
    return [line.strip().split(", ") for line in text.strip("\n").split("\n")]


_SYNONYM_LINES = _parse_synonyms(COCO_SYNONYMS_TXT)

# category -> every entry of its line (the category itself first; duplicates kept).
COCO_SYNONYMS: Dict[str, List[str]] = {line[0]: list(line) for line in _SYNONYM_LINES}

_COCO_PAIRS = ["motor bike", "motor cycle", "air plane", "traffic light", "street light",
               "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter",
               "suit case", "sports ball", "baseball bat", "baseball glove", "tennis racket",
               "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
               "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven",
               "home plate", "train track"]
_ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
            "giraffe", "animal", "cub"]

# Two (singularized) tokens -> the word they are treated as (official rules).
COCO_DOUBLE_WORDS: Dict[str, str] = {p: p for p in _COCO_PAIRS}
for _a in _ANIMALS:
    COCO_DOUBLE_WORDS[f"baby {_a}"] = _a
    COCO_DOUBLE_WORDS[f"adult {_a}"] = _a
for _v in ("jet", "train"):
    COCO_DOUBLE_WORDS[f"passenger {_v}"] = _v
COCO_DOUBLE_WORDS.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})


# ----------------------------------------------------------------------------- singularize
# The rules of pattern.en.singularize (pattern 2.6 and later), applied in order.
_SING_RULES = [(re.compile(a), b) for a, b in [
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"),
    (r"(?i)(ap|vert|ind)ices$", r"\1ex"), (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"), (r"(?i)(m)ovies$", r"\1ovie"),
    (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"),
    (r"erves$", "erve"), (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"), (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"),
    (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"),
    (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(?i)(.)oses$", r"\1osis"), (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", ""),
]]
_SING_KEEP = (  # uninflected + uncountable: a word that is a suffix of one is returned as is
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches "
    "djinn high-jinks proceedings whiting britches eland homework rabies wildebeest carp elk "
    "innings salmon chassis flounder jackanapes scissors christmas gallows mackerel series "
    "clippers georgia measles shears cod graffiti mews species contretemps mumps swine corps "
    "news swiss advice equipment happiness luggage software bread fruit information "
    "mathematics progress understanding butter furniture ketchup mayonnaise research water "
    "cheese garbage knowledge meat rice electricity gravel love mustard sand").split()
_SING_IE = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie "
    "beanie eyrie indie oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie "
    "goonie laddie pixie techie bombie groupie laramie quickie ^tie collie hankie lingerie "
    "reverie toughie cookie hippie meanie rookie valkyrie").split()
_SING_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef",
    "brethren": "brother", "children": "child", "corpora": "corpus", "corpuses": "corpus",
    "ephemerides": "ephemeris", "feet": "foot", "ganglia": "ganglion", "geese": "goose",
    "genera": "genus", "genii": "genie", "graffiti": "graffito", "helves": "helve",
    "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen",
    "occipita": "occiput", "octopodes": "octopus", "opera": "opus", "opuses": "opus",
    "our": "my", "oxen": "ox", "penes": "penis", "penises": "penis", "people": "person",
    "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth", "testes": "testis",
    "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}
_PLURAL_PREPOSITIONS = set(
    "about before during of till above behind except off to across below for on under after "
    "beneath from onto until among beside in out unto around besides into over upon at "
    "between near since with athwart betwixt beyond but by".split())


@functools.lru_cache(maxsize=65536)
def singularize(word: str) -> str:
    """Singular of a noun by the rules of ``pattern.en.singularize`` (quirks
    included: ``"bus"`` -> ``"bu"``, ``"glass"`` -> ``"glas"``, ``"ties"`` ->
    ``"ty"``, ``"people"`` -> ``"person"``, ``"knives"`` -> ``"knife"``)."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PLURAL_PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in _SING_KEEP):
        return word
    if any(w.endswith(x + "s") for x in _SING_IE):
        return w
    for plural, single in _SING_IRREGULAR.items():
        if w.endswith(plural):
            return re.sub("(?i)" + plural + "$", single, word)
    for suffix, inflection in _SING_RULES:
        m = suffix.search(word)
        if m:
            for k, g in enumerate(m.groups()):
                if g is None:  # pattern drops references to unmatched groups
                    inflection = inflection.replace("\\" + str(k + 1), "")
            return suffix.sub(inflection, word)
    return word


# ----------------------------------------------------------------------------- tokenize
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TB_STEPS = [(re.compile(a), b) for a, b in [
    # starting quotes
    (r"([«“‘„]|[`]+)", r" \1 "), (r'^"', "``"), (r"(``)", r" \1 "),
    (r"([ (\[{<])(\"|'{2})", r"\1 `` "),
    (r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 "),
    # punctuation
    (r"([^.])(\.)([\]\)}>\"'»”’ ]*)\s*$", r"\1 \2 \3 "), (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "), (r"\.{2,}", r" \g<0> "), (r"[;@#$%&]", r" \g<0> "),
    (r"[\u2012-\u2015]", r" \g<0> "), (r"([^.])(\.)([\]\)}>\"']*)\s*$", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "), (r"([^'])' ", r"\1 ' "), (r"[*]", r" \g<0> "),
    # brackets, double dashes
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "), (r"--", r" -- "),
]]
_TB_ENDING = [(re.compile(a), b) for a, b in [
    (r"([»”’])", r" \1 "), (r"''", " '' "), (r'"', " '' "), (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
]]
_TB_CONTRACTIONS = [re.compile(p) for p in [
    r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b",
    r"(?i)\b(gon)(?#X)(na)\b", r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b",
    r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
    r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b",
]]


def word_tokenize(text: str) -> List[str]:
    """Tokens as ``nltk.word_tokenize`` gives them: sentences split after
    ``.``/``!``/``?`` + whitespace (Punkt's abbreviation / initial handling is
    not reproduced), then the Treebank rules: punctuation, brackets, quotes
    and sentence-final periods become tokens, clitics split (``dog's`` ->
    ``dog 's``), hyphenated words and inner periods stay attached."""
    tokens: List[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        s = sentence
        for rx, sub in _TB_STEPS:
            s = rx.sub(sub, s)
        s = " " + s + " "
        for rx, sub in _TB_ENDING:
            s = rx.sub(sub, s)
        for rx in _TB_CONTRACTIONS:
            s = rx.sub(r" \1 \2 ", s)
        tokens.extend(s.split())
    return tokens


def merge_coco_words(words: Sequence[str]) -> List[str]:
    """Steps 2 and 3 of ``caption_to_words`` on normalized words: double words merged
    left to right (:data:`COCO_DOUBLE_WORDS`), ``seat`` dropped when ``toilet`` is there."""
    merged: List[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in COCO_DOUBLE_WORDS:
            merged.append(COCO_DOUBLE_WORDS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return merged


# ----------------------------------------------------------------------------- custom vocab
_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "ox": "oxen", "knife": "knives",
    "wife": "wives", "leaf": "leaves", "shelf": "shelves", "calf": "calves", "wolf": "wolves",
    "half": "halves", "loaf": "loaves",
}
_INVARIANT = {"sheep", "people", "children", "cattle", "oxen", "scissors", "skis", "luggage",
              "broccoli", "fish", "deer", "bison", "series", "species", "men", "women", "knives"}


def pluralize(word: str) -> str:
    """Plural of a single English noun (regular rules + small irregular table);
    used to extend custom vocabularies."""
    w = word.lower()
    if w in _INVARIANT:
        return w
    if w in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[w]
    for sing in ("woman", "man"):  # compounds: "policeman" -> "policemen"
        if w.endswith(sing) and len(w) > len(sing):
            return w[: -len(sing)] + _IRREGULAR_PLURALS[sing]
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
        None (default) = the official COCO table and rules.
      extra_phrases: custom vocabularies only: phrase -> canonical object,
        matched with priority over a shorter synonym.
      add_plurals: custom vocabularies only: also match the plural of every
        surface form (last word pluralized).
    """

    def __init__(self, synonyms: Optional[Mapping[str, Iterable[str]]] = None,
                 extra_phrases: Optional[Mapping[str, str]] = None,
                 add_plurals: bool = True):
        self.coco_rules = synonyms is None
        if self.coco_rules:
            if extra_phrases:
                raise ValueError("extra_phrases applies to custom vocabularies; the COCO "
                                 "rules are fixed (COCO_DOUBLE_WORDS)")
            self.objects = [line[0] for line in _SYNONYM_LINES]
            self.inverse: Dict[str, str] = {}
            for line in _SYNONYM_LINES:
                for s in line:
                    self.inverse[s] = line[0]
            return
        self.objects = list(synonyms.keys())
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
        """Canonical object of a vocabulary word (``"man"`` -> ``"person"``), else None.
        COCO: exact table entries (singular, lowercase); custom: any surface form."""
        if self.coco_rules:
            return self.inverse.get(word)
        return self.surface.get(tuple(_tokens(word)))

    def _coco_words(self, caption: str) -> List[str]:
        return merge_coco_words([singularize(w) for w in word_tokenize(caption.lower())])

    def mentions(self, caption: str) -> List[Tuple[str, str]]:
        """All object mentions as ``(word, canonical)`` in caption order, with
        multiplicity.  COCO: ``word`` is the singularized / merged table entry
        (the official ``words``); custom: the matched surface phrase."""
        if self.coco_rules:
            return [(w, self.inverse[w]) for w in self._coco_words(caption) if w in self.inverse]
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
        return found

    def mentioned_objects(self, caption: str) -> List[str]:
        """Canonical objects mentioned in ``caption`` (with multiplicity, in order)."""
        return [c for _, c in self.mentions(caption)]

    def ground_truth(self, segmentation_objects: Optional[Iterable[str]] = None,
                     reference_captions: Optional[Sequence[str]] = None) -> Set[str]:
        """Official ground truth: canonical segmentation labels (COCO category
        names) U objects mentioned in the reference captions.  Labels not in the
        vocabulary are kept as given."""
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
          gt_objects: id -> ground-truth objects (canonical names or table
            entries; they are canonicalized).

        Returns:
          ``{"chair_i", "chair_s", "num_mentions", "num_hallucinated_mentions",
          "num_captions", "num_hallucinated_captions", "per_id"}``; ``per_id[id]``
          holds ``mentions`` [(word, canonical)], ``hallucinated``
          [(word, canonical)], ``gt_objects``, ``chair_i``, ``chair_s``.
          ``chair_i`` is 0.0 when there are no mentions at all (the official
          script divides by zero there).
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
