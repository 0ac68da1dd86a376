"""Tests for mllm_jax.eval.caption (CIDEr-D, BLEU, PTB tokenization) and mllm_jax.eval.chair."""

import math

import pytest

from mllm_jax.eval.caption import bleu, cider_d, ptb_tokenize
from mllm_jax.eval.chair import (COCO_DOUBLE_WORDS, COCO_SYNONYMS, ChairEvaluator, pluralize,
                                  singularize, word_tokenize)


# ----------------------------------------------------------------------------- PTB tokenizer

@pytest.mark.parametrize("text,expected", [
    # Expected strings: output of pycocoevalcap's CoreNLP 3.4.1 PTBTokenizer
    # (-preserveLines -lowerCase) with PTB_PUNCTUATIONS removed.
    ("A man's dog, (running) fast!", "a man 's dog -lrb- running -rrb- fast"),
    ("Don't stop.", "do n't stop"),
    ("It costs 1,000 dollars... really?", "it costs 1,000 dollars really"),
    ('A "hot-dog" stand; at 10:30 - noon.', "a hot-dog stand at 10:30 noon"),
    ("Two  dogs\nplay --  outside.", "two dogs play outside"),
    ("I cannot see, gonna look!", "i can not see gon na look"),
    ("a cat/dog on a [red] {sofa} *now* & then",
     "a cat/dog on a -lsb- red -rsb- -lcb- sofa -rcb- * now * & then"),
    ("The U.S. flag waves.", "the u.s. flag waves"),
    ("It's 50% off $5 -- dogs' bowls 'quoted' text",
     "it 's 50 % off $ 5 dogs bowls quoted text"),
    ("Mr. Smith's cat sits... on the mat.", "mr. smith 's cat sits on the mat"),
    ("a dog. a cat.", "a dog a cat"),
    ("two dogs.three cats", "two dogs.three cats"),
    ("The answer is no.", "the answer is no"),
    ("No. 5 bus", "no. 5 bus"),
    ("A man, a dog, etc.", "a man a dog etc."),
    ("what?! a dog!!", "what ?! a dog !!"),
    ("a man\u2026and a cafe \u2014 nice", "a man and a cafe nice"),
    ("don't can't won't", "do n't ca n't wo n't"),
    ("a b&w photo, #1 fan", "a b & w photo # 1 fan"),
    ("version 2.0.", "version 2.0"),
])
def test_ptb_tokenize(text, expected):
    assert ptb_tokenize(text) == expected


# ----------------------------------------------------------------------------- CIDEr-D

def _cos(num, hyp_sq, ref_sq):
    return num / (math.sqrt(hyp_sq) * math.sqrt(ref_sq))


def test_cider_d_hand_computed():
    refs = {
        1: ["a cat sits", "a dog"],
        2: ["a dog runs"],
        3: ["the bird"],
    }
    cands = {1: "a cat", 2: "a dog runs fast", 3: "the the bird"}
    # Document frequencies over the 3 reference sets: "a", "dog", ("a","dog") appear in
    # 2 images, every other reference n-gram in 1; "fast" / ("the","the") etc. in 0.
    L = math.log(3.0)                    # weight for df in {0, 1}
    M = math.log(3.0) - math.log(2.0)    # weight for df == 2
    pen1 = math.exp(-1.0 / 72.0)         # |delta| = 1 bigram, sigma = 6

    # image 1, ref "a cat sits": n1 hyp {a:M, cat:L} ref {a:M, cat:L, sits:L};
    # n2 hyp {a cat:L} ref {a cat:L, cat sits:L}; n3/n4 hyp empty -> 0.
    r1 = (_cos(M * M + L * L, M * M + L * L, M * M + 2 * L * L)
          + _cos(L * L, L * L, 2 * L * L)) * pen1 / 4
    # image 1, ref "a dog": n1 ref {a:M, dog:M}; bigram "a dog" != "a cat"; equal lengths.
    r2 = _cos(M * M, M * M + L * L, 2 * M * M) / 4
    s1 = 10 * (r1 + r2) / 2
    # image 2: hyp n1 {a:M, dog:M, runs:L, fast:L}, n2 {a dog:M, dog runs:L, runs fast:L},
    # n3 {a dog runs:L, dog runs fast:L}, n4 {..:L} vs ref (no 4-gram -> 0).
    s2 = 10 * pen1 * (_cos(2 * M * M + L * L, 2 * M * M + 2 * L * L, 2 * M * M + L * L)
                      + _cos(M * M + L * L, M * M + 2 * L * L, M * M + L * L)
                      + _cos(L * L, 2 * L * L, L * L)) / 4
    # image 3: hyp n1 {the:2L, bird:L}: clipped min(2L, L) * L; n2 {the the:L, the bird:L}.
    s3 = 10 * pen1 * (_cos(2 * L * L, 5 * L * L, 2 * L * L) + _cos(L * L, 2 * L * L, L * L)) / 4

    corpus, per = cider_d(cands, refs)
    assert per[1] == pytest.approx(s1, rel=1e-12)
    assert per[2] == pytest.approx(s2, rel=1e-12)
    assert per[3] == pytest.approx(s3, rel=1e-12)
    assert corpus == pytest.approx((s1 + s2 + s3) / 3, rel=1e-12)
    # sanity on the magnitudes
    assert 0 < per[3] < per[2] < 10


def test_cider_d_identical_is_max():
    refs = {
        "a": ["a red car parked on the street"],
        "b": ["a dog runs across the green field"],
        "c": ["two people ride bikes in the park"],
    }
    corpus, per = cider_d({k: v[0] for k, v in refs.items()}, refs)
    # identical candidate/reference: cosine 1 for every n -> 10 (x10 scaling, mean over n)
    for k in refs:
        assert per[k] == pytest.approx(10.0, rel=1e-12)
    assert corpus == pytest.approx(10.0)
    # 2-word captions have no 3-/4-grams: only n=1,2 contribute -> 10 * 2/4 = 5
    refs2 = {1: ["a cat"], 2: ["a dog"]}
    _, per2 = cider_d({1: "a cat", 2: "a dog"}, refs2)
    assert per2[1] == pytest.approx(5.0) and per2[2] == pytest.approx(5.0)
    # a single-image corpus has idf log(1) = 0 everywhere -> 0 (official behaviour)
    assert cider_d({1: "a cat"}, {1: ["a cat"]})[0] == 0.0
    # a perturbed candidate scores lower; matching only one of two refs is averaged
    _, per3 = cider_d({"a": "a red car parked on the road", "b": refs["b"][0],
                       "c": refs["c"][0]}, refs)
    assert per3["a"] < 10.0
    refs4 = dict(refs, a=["a red car parked on the street", "a blue truck"])
    _, per4 = cider_d({k: v[0] for k, v in refs.items()}, refs4)
    assert per4["a"] < 10.0


def test_cider_d_length_penalty():
    refs = {1: ["a cat"], 2: ["a dog runs"], 3: ["the bird"]}
    cands = {1: "a cat", 2: "a dog runs fast", 3: "the the bird"}
    _, p6 = cider_d(cands, refs, sigma=6.0)
    _, pinf = cider_d(cands, refs, sigma=1e12)
    assert p6[1] == pytest.approx(pinf[1])                       # delta = 0: no penalty
    assert p6[2] / pinf[2] == pytest.approx(math.exp(-1 / 72))   # delta = 1
    # delta = 3 (candidate 3 words longer)
    cands_long = {**cands, 2: "a dog runs fast and far"}
    _, q6 = cider_d(cands_long, refs, sigma=6.0)
    _, qinf = cider_d(cands_long, refs, sigma=1e12)
    assert q6[2] / qinf[2] == pytest.approx(math.exp(-9 / 72))


def test_cider_d_tokenize_flag():
    refs = {1: ["A cat, sitting."], 2: ["A dog!"]}
    c1, _ = cider_d({1: "a cat sitting", 2: "a dog"}, {1: ["a cat sitting"], 2: ["a dog"]})
    c2, _ = cider_d({1: "A cat sitting.", 2: "a DOG"}, refs, tokenize=True)
    assert c1 == pytest.approx(c2)


# ----------------------------------------------------------------------------- BLEU

def test_bleu_textbook_modified_precision():
    # Papineni et al. (2002): "the the the the the the the" -> modified unigram precision 2/7.
    refs = {0: ["the cat is on the mat", "there is a cat on the mat"]}
    b = bleu({0: "the the the the the the the"}, refs)
    assert b[0] == pytest.approx(2 / 7)   # closest ref length 7 -> BP = 1
    assert b[1] < 1e-6                    # no matching bigram


def test_bleu_hand_computed():
    refs = {0: ["the cat is on the mat"]}
    b = bleu({0: "the cat sat on the mat"}, refs)
    assert b[0] == pytest.approx(5 / 6)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b[2] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b[3] < 1e-3
    # corpus-level: counts are pooled, not averaged
    b2 = bleu({0: "the cat sat on the mat", 1: "a dog"}, {0: refs[0], 1: ["a dog"]})
    assert b2[0] == pytest.approx(7 / 8)
    assert b2[1] == pytest.approx(math.sqrt(7 / 8 * 4 / 6))


def test_bleu_brevity_penalty_and_closest():
    b = bleu({0: "the cat"}, {0: ["the cat is on the mat"]})
    assert b[0] == pytest.approx(math.exp(1 - 6 / 2))
    assert b[1] == pytest.approx(math.exp(1 - 6 / 2))
    # candidate length 5, refs of length 4 and 6: tie -> shorter (4) -> no penalty
    b = bleu({0: "a b c d e"}, {0: ["a b c d", "a b c d e f"]})
    assert b[0] == pytest.approx(1.0)
    # refs of length 3 and 9: closest is 3 -> no penalty even though 9 exists
    b = bleu({0: "x y z w"}, {0: ["x y z", "x y z w q q q q q"]})
    assert b[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- CHAIR

def test_pluralize():
    assert pluralize("man") == "men"
    assert pluralize("bus") == "buses"
    assert pluralize("sandwich") == "sandwiches"
    assert pluralize("knife") == "knives"
    assert pluralize("sheep") == "sheep"
    assert pluralize("policeman") == "policemen"
    assert pluralize("dog") == "dogs"
    assert pluralize("pony") == "ponies"


@pytest.mark.parametrize("word,expected", [
    ("dogs", "dog"), ("men", "man"), ("women", "woman"), ("policemen", "policeman"),
    ("people", "person"), ("children", "child"), ("knives", "knife"), ("mice", "mouse"),
    ("oxen", "ox"), ("teeth", "tooth"), ("benches", "bench"), ("buses", "bus"),
    ("skis", "ski"), ("ponies", "pony"), ("giraffes", "giraffe"), ("horses", "horse"),
    # pattern.en quirks the official scorer inherits
    ("bus", "bu"), ("glass", "glas"), ("glasses", "glass"), ("tennis", "tenni"),
    ("ties", "ty"), ("doggies", "doggies"), ("four", "fmy"),
    # left alone: uninflected / uncountable / no rule
    ("sheep", "sheep"), ("scissors", "scissors"), ("luggage", "luggage"), ("cattle", "cattle"),
    ("a", "a"), ("is", "is"), ("knife", "knife"), ("hot-dogs", "hot-dog"),
])
def test_singularize_matches_pattern_en(word, expected):
    assert singularize(word) == expected


def test_word_tokenize_like_nltk():
    assert word_tokenize("a man's dog, (running) fast! two hot-dogs. a cat") == [
        "a", "man", "'s", "dog", ",", "(", "running", ")", "fast", "!", "two", "hot-dogs",
        ".", "a", "cat"]
    assert word_tokenize("don't \"stop\" cannot 3,000 dogs.") == [
        "do", "n't", "``", "stop", "''", "can", "not", "3,000", "dogs", "."]


def test_official_synonym_table():
    assert len(COCO_SYNONYMS) == 80
    assert COCO_SYNONYMS["person"][:3] == ["person", "girl", "boy"]
    assert "panda" in COCO_SYNONYMS["bear"] and "bagel" in COCO_SYNONYMS["donut"]
    assert "recliner" in COCO_SYNONYMS["couch"] and "container" in COCO_SYNONYMS["bowl"]
    # parsing quirks of the official file are kept
    assert " motor bike" in COCO_SYNONYMS["motorcycle"]
    assert "iPhone" in COCO_SYNONYMS["cell phone"]
    assert COCO_DOUBLE_WORDS["baby bird"] == "bird"
    assert COCO_DOUBLE_WORDS["passenger jet"] == "jet"
    assert COCO_DOUBLE_WORDS["toilet seat"] == "toilet"
    assert COCO_DOUBLE_WORDS["wine glas"] == "wine glass"


@pytest.mark.parametrize("caption,expected", [
    ("Two men eat hot dogs at a dining table.",
     [("man", "person"), ("hot dog", "hot dog"), ("table", "dining table")]),
    ("A teddy bear next to a bear", [("teddy bear", "teddy bear"), ("bear", "bear")]),
    ("baby elephants and people", [("elephant", "elephant"), ("person", "person")]),
    ("an adult giraffe", [("giraffe", "giraffe")]),
    ("a passenger jet", [("jet", "airplane")]),
    ("passenger trains on a train track", [("train", "train")]),  # "train track" is no train
    ("a toilet with the seat up", [("toilet", "toilet")]),
    ("a toilet seat", [("toilet", "toilet")]),
    ("a man sits on a seat", [("man", "person"), ("seat", "chair")]),
    ("kittens on the sofas", [("kitten", "cat"), ("sofa", "couch")]),
    ("a man with a bow tie", [("man", "person"), ("tie", "tie")]),
    ("two wine glasses and a wine glass",
     [("wine glass", "wine glass"), ("wine glass", "wine glass")]),
    ("a tennis racket", [("racket", "tennis racket")]),   # "tennis" -> "tenni"
    ("sports balls", [("ball", "sports ball")]),
    ("a motor bike and a motorbike", [("motorbike", "motorcycle")]),  # " motor bike" quirk
    ("a bus next to two buses", [("bus", "bus")]),       # "bus" -> "bu" quirk
    ("an iPhone and a phone", [("phone", "cell phone")]),
    ("a hot-dog stand", []),                             # hyphenated token stays whole
    ("stop signs and traffic lights",
     [("stop sign", "stop sign"), ("traffic light", "traffic light")]),
    ("the sky is blue", []),
])
def test_mentions_coco(caption, expected):
    assert ChairEvaluator().mentions(caption) == expected


def test_chair_exact_fractions():
    ev = ChairEvaluator()
    caps = {
        1: "Two men eat hot dogs at a dining table.",   # person, hot dog, dining table: ok
        2: "A man walks two dogs past some cars.",      # cars hallucinated (plural)
        3: "A teddy bear sits on a chair next to a cat.",  # chair, cat hallucinated
        4: "A woman holds a cell phone and a phone.",   # 3 mentions, none hallucinated
    }
    gt = {
        1: {"person", "hot dog", "dining table"},
        2: {"person", "dog"},
        3: {"teddy bear"},
        4: {"woman", "cell phone"},   # table entries are canonicalized
    }
    out = ev.chair(caps, gt)
    assert out["num_mentions"] == 12
    assert out["num_hallucinated_mentions"] == 3
    assert out["chair_i"] == 3 / 12
    assert out["chair_s"] == 2 / 4
    assert out["per_id"][2]["hallucinated"] == [("car", "car")]
    assert out["per_id"][3]["hallucinated"] == [("chair", "chair"), ("cat", "cat")]
    assert out["per_id"][3]["chair_i"] == 2 / 3
    assert out["per_id"][1]["chair_s"] == 0 and out["per_id"][2]["chair_s"] == 1
    # "hot dogs" must not count as a (hallucinated) dog
    assert all(c != "dog" for _, c in out["per_id"][1]["mentions"])


def test_chair_ground_truth_from_segments_and_captions():
    ev = ChairEvaluator()
    gt = ev.ground_truth(["person", "tv"], ["A kitten sleeps on a sofa.", "a cat on a couch"])
    assert gt == {"person", "tv", "cat", "couch"}
    out = ev.chair({0: "a cat and a dog on a couch watching television"}, {0: gt})
    assert out["chair_i"] == 1 / 4 and out["chair_s"] == 1.0


def test_chair_custom_vocabulary():
    ev = ChairEvaluator({"red cube": ["cube", "block"], "blue sphere": ["sphere", "ball", "orb"],
                         "green pyramid": ["pyramid"]})
    assert ev.mentioned_objects("Two blocks, a red cube and a ball") == [
        "red cube", "red cube", "blue sphere"]
    out = ev.chair({0: "two blocks and a ball", 1: "a pyramid", 2: "nothing here"},
                   {0: {"red cube"}, 1: {"green pyramid"}, 2: set()})
    # mentions: blocks, ball (hallucinated), pyramid -> CHAIR_i = 1/3, CHAIR_s = 1/3
    assert out["num_mentions"] == 3
    assert out["chair_i"] == 1 / 3
    assert out["chair_s"] == 1 / 3
    assert out["per_id"][0]["hallucinated"] == [("ball", "blue sphere")]


def test_chair_empty():
    ev = ChairEvaluator()
    out = ev.chair({0: "the sky"}, {0: set()})
    assert out["chair_i"] == 0.0 and out["chair_s"] == 0.0
