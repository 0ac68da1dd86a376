"""The shapes world: deterministic scenes whose pixels, text and questions agree with the
objects; the co-occurrence and hallucination statistics it promises; POPE negatives; LLaVA
files that our readers, templates and pipeline checks accept; a tokenizer that round-trips;
and the TFDS builder."""
import io
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data import templates as T
from mllm_jax.data.llava_json import read_llava_json, read_preference_json
from mllm_jax.data.pipeline import check_conversation
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.demo import shapes as S

WORLD = S.World()
SIZES = {"train": 400, "val": 60}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return S.write_dataset(out, SIZES, seed=5)


@pytest.fixture(scope="module")
def scenes():
    return S.make_split("train", 2000, seed=0)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _scene_by_id(split, n, seed=5):
    return {s.id: s for s in S.make_split(split, n, seed)}


# ---- determinism ----------------------------------------------------------------------------
def test_same_seed_same_bytes_and_splits_disjoint(built, tmp_path):
    a = S.make_split("train", 30, seed=3)
    b = S.make_split("train", 30, seed=3)
    assert all(x.image.tobytes() == y.image.tobytes() and x.objects == y.objects
               for x, y in zip(a, b))
    # Scene i does not depend on the split's size.
    assert [s.image.tobytes() for s in S.make_split("train", 10, seed=3)] == \
        [s.image.tobytes() for s in a[:10]]
    other_seed = S.make_split("train", 30, seed=4)
    assert sum(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, other_seed)) == 0
    train = {s.image.tobytes() for s in S.make_split("train", 300, seed=3)}
    val = {s.image.tobytes() for s in S.make_split("val", 300, seed=3)}
    test = {s.image.tobytes() for s in S.make_split("test", 300, seed=3)}
    assert not (train & val) and not (train & test) and not (val & test)
    # A second build writes identical files (JSON, PNG, tokenizer).
    again = S.write_dataset(tmp_path / "again", SIZES, seed=5)
    names = [k for k in built if k not in ("tokenizer",)]
    for k in names:
        assert open(built[k], "rb").read() == open(again[k], "rb").read(), k
    for f in ("tokenizer.model", "tokenizer_config.json"):
        assert open(os.path.join(built["tokenizer"], f), "rb").read() == \
            open(os.path.join(again["tokenizer"], f), "rb").read(), f
    png = os.path.join(os.path.dirname(built["world"]), "images", "val", "000007.png")
    png2 = os.path.join(os.path.dirname(again["world"]), "images", "val", "000007.png")
    assert open(png, "rb").read() == open(png2, "rb").read()


# ---- rendering ------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [S.World(), S.World(image_size=48),
                                   S.World(image_size=40, textures=True),
                                   S.World(image_size=48, small=0.7, jitter=0.25)])
def test_objects_are_drawn_in_their_boxes(world):
    scenes = S.make_split("val", 150, seed=1, world=world)
    for s in scenes:
        img = s.image
        assert img.shape == (world.image_size, world.image_size, 3) and img.dtype == np.uint8
        assert world.min_objects <= len(s.objects) <= world.max_objects
        covered = np.zeros(img.shape[:2], bool)
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            colour = np.asarray(S.COLOURS[o.colour])
            allowed = [colour, (colour * 0.55).astype(np.uint8), [s.background] * 3]
            patch = img[y0:y1, x0:x1].reshape(-1, 3)
            assert all(any((p == a).all() for a in allowed) for p in patch), (s.id, o)
            centre = img[(y0 + y1) // 2, (x0 + x1) // 2]
            assert any((centre == a).all() for a in allowed[:2]), (s.id, o)
            # At least a third of the box is the object's colour.
            is_obj = ~np.all(patch == s.background, axis=1)
            assert is_obj.mean() > 0.3, (s.id, o)
            # The box lies inside its grid cell.
            edges = S.cell_edges(world)
            r, c = o.cell
            assert edges[c] <= x0 < x1 <= edges[c + 1] and edges[r] <= y0 < y1 <= edges[r + 1]
            covered[y0:y1, x0:x1] = True
        assert (img[~covered] == s.background).all(), s.id
        assert len({o.cell for o in s.objects}) == len(s.objects)
    if world.textures:
        assert {o.texture for s in scenes for o in s.objects} == {"plain", "striped"}


@pytest.mark.parametrize("jitter", [0.0, 0.25, 1.0])
def test_jitter_bounds_where_objects_sit_in_their_cell(jitter):
    world = S.World(image_size=48, jitter=jitter)
    offsets = {}  # (size, free pixels) -> offsets seen
    for s in S.make_split("val", 200, seed=2, world=world):
        for o in s.objects:
            x0, y0, x1, _ = o.bbox
            edges = S.cell_edges(world)
            free = edges[o.cell[1] + 1] - edges[o.cell[1]] - (x1 - x0)
            offsets.setdefault(free, set()).add(x0 - edges[o.cell[1]])
            offsets[free].add(y0 - edges[o.cell[0]])
    for free, seen in offsets.items():
        lo = round(free * (1 - jitter) / 2)
        assert min(seen) >= lo and max(seen) <= free - lo, (free, seen)
        assert len(seen) == free - 2 * lo + 1, (free, seen)  # every allowed offset occurs
    if jitter == 0:
        assert all(len(seen) == 1 for seen in offsets.values())


# ---- text and questions -----------------------------------------------------------------
def test_captions_mention_exactly_the_objects():
    for i, s in enumerate(S.make_split("val", 200, seed=2)):
        present = sorted(s.names)
        assert sorted(S.mentioned_objects(S.detailed_caption(s.objects))) == present
        assert set(S.mentioned_objects(S.short_caption(s.objects, style=i % 3))) == set(present)
        # Synonyms ("ball", "box", ...) are read back as the canonical object.
        rng = np.random.default_rng(i)
        assert set(S.mentioned_objects(
            S.short_caption(s.objects, rng, S.World(synonym_rate=1.0)))) == set(present)
    assert S.mentioned_objects("two red balls, a blue box and a striped white plus.") == \
        ["red circle", "blue square", "white cross"]


def test_question_answers_agree_with_the_scene():
    seen = set()
    for i, s in enumerate(S.make_split("val", 300, seed=4)):
        rng = np.random.default_rng(i)
        for kind in S.VQA_KINDS:
            qa = S.question(kind, s, rng)
            if qa is None:
                continue
            seen.add(kind)
            q, a = qa["question"], qa["answer"]
            if kind == "existence":
                name = q[len("is there a "):-len(" in the image?")]
                assert a == ("yes" if name in s.names else "no"), (s.id, q, a)
            elif kind in ("count", "cot_count"):
                if "objects" in q:
                    assert int(a) == len(s.objects)
                    continue
                shape = next(sh for sh in WORLD.shapes if f" {S.pluralize(sh)} " in q)
                n = sum(o.shape == shape for o in s.objects)
                if kind == "count":
                    assert a == str(n), (s.id, q, a)
                else:
                    assert a.endswith(f"answer: {n}") and qa["count"] == n, (s.id, q, a)
                    assert len(S.mentioned_objects(a)) == n
            elif kind == "colour":
                shape = q[len("what colour is the "):-1]
                (obj,) = [o for o in s.objects if o.shape == shape]
                assert a == obj.colour
            elif kind in ("position", "box"):
                (obj,) = [o for o in s.objects if o.name == qa["object"]]
                assert f"the {obj.name}?" in q
                if kind == "position":
                    assert a == WORLD.cell_name(obj.cell)
                else:
                    box = np.asarray(S.parse_box(a)) * WORLD.image_size / 100
                    assert np.abs(box - np.asarray(obj.bbox)).max() <= 0.5 * 32 / 100 + 1e-6
            elif kind == "what_at":
                box = np.asarray(S.parse_box(q)) * WORLD.image_size / 100
                (obj,) = [o for o in s.objects
                          if np.abs(box - np.asarray(o.bbox)).max() <= 0.17]
                assert a == S.object_phrase(obj) and S.mentioned_objects(a) == [obj.name]
    assert seen == set(S.VQA_KINDS)


def test_answer_checking(built):
    entries = _load(built["eval_val"])
    kinds = {e["kind"] for e in entries}
    assert kinds == {"caption", "detail", "pope", "fewshot", *S.VQA_KINDS}
    scored = [e for e in entries if e["kind"] not in ("caption", "detail")]
    assert all(S.answer_correct(e, e["answer"]) for e in scored)
    wrong = {"existence": lambda a: "no" if a == "yes" else "yes",
             "pope": lambda a: "no" if a == "yes" else "yes",
             "count": lambda a: str(int(a) + 1), "colour": lambda a: "red" if a != "red" else
             "blue", "position": lambda a: "center" if a != "center" else "top left",
             "box": lambda a: "[0, 0, 5, 5]", "cot_count": lambda a: "answer: 9",
             "what_at": lambda a: "a small purple cross" if "purple cross" not in a
             else "a red circle", "fewshot": lambda a: a + " no"}
    assert not any(S.answer_correct(e, wrong[e["kind"]](e["answer"])) for e in scored)
    acc = S.accuracy_by_kind(scored, [e["answer"] for e in scored])
    assert set(acc) == {"pope_random", "pope_popular", "pope_adversarial", "fewshot",
                        *S.VQA_KINDS} and all(v == 1.0 for v in acc.values())
    assert S.answer_correct({"kind": "count", "answer": "2"}, "there are two squares.")
    assert S.answer_correct({"kind": "position", "answer": "top left"}, "at the top left.")
    assert S.answer_correct({"kind": "box", "answer": "[10, 10, 40, 40]"}, "[12, 11, 40, 42]")


# ---- statistics, POPE, hallucination ------------------------------------------------------
def test_companions_co_occur(scenes):
    stats = S.statistics(scenes)
    n = len(scenes)
    for k, name in enumerate(WORLD.objects):
        j = WORLD.objects.index(WORLD.companions[name])
        assert WORLD.companions[WORLD.companions[name]] == name != WORLD.companions[name]
        p_companion = stats.frequency[j] / n
        p_given = stats.cooccurrence[k, j] / stats.frequency[k]
        assert p_given > 2.5 * p_companion, (name, p_given, p_companion)
    # Popularity differs between objects (so "popular" negatives are not "random" ones).
    assert stats.frequency.max() > 2.5 * stats.frequency.min()


def test_pope_negatives_absent_popular_and_adversarial(scenes):
    stats = S.statistics(scenes)
    rng = np.random.default_rng(0)
    companion_hits = companion_cases = 0
    for s in scenes[:300]:
        present = set(s.names)
        items = S.pope_questions(s, stats, rng)
        for mode in S.POPE_MODES:
            yes = [p["object"] for p in items if p["mode"] == mode and p["answer"] == "yes"]
            no = [p["object"] for p in items if p["mode"] == mode and p["answer"] == "no"]
            assert set(yes) <= present and len(yes) == min(3, len(present)) == len(no)
            assert not set(no) & present and len(set(no)) == len(no)
            absent = [o for o in WORLD.objects if o not in present and o not in no]
            freq = {o: stats.frequency[stats.index(o)] for o in WORLD.objects}
            if mode == "popular":
                assert min(freq[o] for o in no) >= max(freq[o] for o in absent)
            if mode == "adversarial":
                def score(o):
                    return sum(stats.cooccurrence[stats.index(p), stats.index(o)]
                               for p in present)
                assert min(map(score, no)) >= max(map(score, absent))
                missing = {WORLD.companions[p] for p in present} - present
                if missing:
                    companion_cases += 1
                    companion_hits += bool(missing & set(no))
        for p in items:
            assert p["question"] == S.existence_question(p["object"])
    assert companion_hits / companion_cases > 0.95
    with pytest.raises(ValueError, match="unknown POPE mode"):
        S.negatives({"red circle"}, "rare", stats, rng, 1)


def test_hallucinated_mentions_only_where_intended(built):
    train = _scene_by_id("train", SIZES["train"])
    caps = _load(built["captions_train"])
    with_extra = 0
    for r in caps:
        s = train[r["id"]]
        extra = set(S.mentioned_objects(r["conversations"][1]["value"])) - set(s.names)
        assert extra == set(r["hallucinated"]), r
        if extra:
            with_extra += 1
            (name,) = extra
            assert name in {WORLD.companions[n] for n in s.names}
    assert 0.04 < with_extra / len(caps) < 0.2
    for r in _load(built["instruct_train"]):
        if r["id"].endswith("-fewshot"):
            continue
        s = train[r["id"]]
        for kind, turn in zip(r["kinds"], r["conversations"][1::2]):
            if kind in ("detail", "caption"):
                extra = set(S.mentioned_objects(turn["value"])) - set(s.names)
                assert extra <= set(r["hallucinated"])
    val = _scene_by_id("val", SIZES["val"])
    for name in ("captions_val", "instruct_val", "pairs_val", "pairs_train"):
        for r in _load(built[name]):
            if r["id"].endswith("-fewshot"):
                continue
            scene = (val if "val" in name else train)[r["id"]]
            texts = [r["caption"]] if "caption" in r else \
                [t["value"] for t in r["conversations"][1::2]]
            assert all(set(S.mentioned_objects(t)) <= set(scene.names) for t in texts), r


def test_preference_pairs(built):
    train = _scene_by_id("train", SIZES["train"])
    prefs = read_preference_json(built["preference_train"])
    raw = _load(built["preference_train"])
    assert len(prefs) == SIZES["train"]
    companion = 0
    for p, r in zip(prefs, raw):
        s = train[p.id]
        assert sorted(S.mentioned_objects(p.chosen)) == sorted(s.names)
        added = sorted(S.mentioned_objects(p.rejected))
        assert added == sorted(s.names + [r["rejected_object"]])
        assert r["rejected_object"] not in s.names
        companion += r["rejected_object"] in {WORLD.companions[n] for n in s.names}
        assert p.prompt == "<image>\n" + S.DETAIL_PROMPT and os.path.isfile(p.images[0])
    assert companion / len(prefs) > 0.6
    scores = S.chair_scores({k: r["rejected"] for k, r in enumerate(raw)},
                            {k: train[r["id"]].names for k, r in enumerate(raw)})
    assert scores["chair_s"] == 1.0 and 0 < scores["chair_i"] < 0.5
    faithful = S.chair_scores({k: r["chosen"] for k, r in enumerate(raw)},
                              {k: train[r["id"]].names for k, r in enumerate(raw)})
    assert faithful["chair_i"] == faithful["chair_s"] == 0.0


def test_yes_no_preference_pairs_choose_the_true_answer(built):
    train = _scene_by_id("train", SIZES["train"])
    raw = _load(built["preference_yesno_train"])
    prefs = read_preference_json(built["preference_yesno_train"])
    assert len(raw) == len(prefs) == SIZES["train"]
    yes = 0
    for p, r in zip(prefs, raw):
        names = train[r["id"][:-len("-yesno")]].names
        assert p.prompt == "<image>\n" + S.existence_question(r["object"])
        assert p.chosen == ("yes" if r["object"] in names else "no")
        assert {p.chosen, p.rejected} == {"yes", "no"}
        assert r["rejected_object"] == (None if p.chosen == "yes" else r["object"])
        yes += p.chosen == "yes"
    assert 0.4 < yes / len(raw) < 0.6


def test_confusable_negatives_share_a_colour_and_a_shape_with_the_scene():
    world = S.World(confusable_rate=1.0)
    rng = np.random.default_rng(0)
    assert S.confusable_negative(["red circle", "blue square"], rng, world) in \
        {"red square", "blue circle"}
    assert S.confusable_negative(["red circle", "red square"], rng, world) is None
    assert S.confusable_negative(["red circle"], rng, world) is None
    scenes = S.make_split("train", 300, seed=3, world=world)
    stats = S.statistics(scenes, world)
    asked = 0
    for i, scene in enumerate(scenes):
        q = S.question("existence", scene, np.random.default_rng(i), world, stats)
        r = S.yesno_preference_record(scene, 3, "train", i, world, stats)
        for name, no in ((q["object"], q["answer"] == "no"), (r["object"], r["chosen"] == "no")):
            assert (name in scene.names) != no
            if no and S.confusable_negative(scene.names, np.random.default_rng(0), world):
                asked += 1
                assert name.split()[0] in {n.split()[0] for n in scene.names}, (scene.id, name)
                assert name.split()[1] in {n.split()[1] for n in scene.names}, (scene.id, name)
    assert asked > 50
    # The default world draws its questions as before (no confusable negatives).
    assert S.World().confusable_rate == 0


# ---- files, templates, tokenizer ----------------------------------------------------------
def test_files_load_and_build_examples(built):
    tok = load_tokenizer(built["tokenizer"])
    for name in ("captions_train", "instruct_train", "instruct_val", "eval_val"):
        records = read_llava_json(built[name])
        assert records, name
        for rec in records:
            assert all(os.path.isfile(p) for p in rec.images), rec.id
            assert check_conversation(rec.conversations, len(rec.images), rec.id) is None
        template = "plain" if name.startswith("captions") else "vicuna_v1"
        for rec in records[:40] + [r for r in records if len(r.images) > 1][:5]:
            ex = T.build_example(rec.conversations, template, tok, image_tokens_per_image=4,
                                 max_length=1024, sample_id=rec.id, system="")
            assert ex["num_images"] == len(rec.images)
            answers = [t["value"] for t in rec.conversations[1::2]]
            target = tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l >= 0])
            assert [a.strip() for a in target.split("</s>")] == answers + [""], rec.id
    kinds = {k for r in _load(built["instruct_train"]) for k in r["kinds"]}
    assert kinds == set(S.INSTRUCT_WEIGHTS) | {"fewshot"}
    pairs = S.read_pairs(built["pairs_val"])
    assert len(pairs) == SIZES["val"] and all(os.path.isfile(p) for p, _ in pairs)
    # Regions: each object's box and phrase, as the scene has them.
    triples = S.read_pairs(built["pairs_val"], regions=True)
    assert [t[:2] for t in triples] == pairs
    for (_, _, regions), scene in zip(triples, S.make_split("val", SIZES["val"], 5, WORLD)):
        assert regions == [(o.bbox, S.object_phrase(o)) for o in scene.objects]
    world = _load(built["world"])
    assert world["objects"] == list(WORLD.objects) and world["sizes"] == SIZES
    few = [e for e in _load(built["eval_val"]) if e["kind"] == "fewshot"]
    assert len(few) == SIZES["val"] and all(len(e["image"]) == 3 for e in few)
    for e in few:
        answers = [t["value"] for t in e["conversations"][1::2]]
        if e["style"] == "word":
            assert all(not a.isdigit() for a in answers)
        assert e["image"][-1] == S.image_path(e["scene"]) and e["answer"] == answers[-1]


@pytest.mark.parametrize("name,template,mode", [("captions_train", "plain", "lm"),
                                                ("instruct_train", "vicuna_v1", "lm"),
                                                ("preference_train", "vicuna_v1", "dpo")])
def test_pipeline_reads_the_files(built, name, template, mode):
    from mllm_jax.data.image import ImageProcessorConfig
    from mllm_jax.data.pipeline import LlavaPipeline

    tok = load_tokenizer(built["tokenizer"])
    records = (read_preference_json if mode == "dpo" else read_llava_json)(built[name])
    cfg = ImageProcessorConfig(size={"shortest_edge": 28}, crop_size=28)
    with LlavaPipeline(records, tok, cfg, template, global_batch_size=8, max_length=256,
                       max_images=3, image_tokens_per_image=16, system="", num_workers=0,
                       mode=mode) as pipe:
        for _ in range(3):
            batch = next(pipe)
        assert pipe.report() == {}  # no record was skipped
    key = "chosen_labels" if mode == "dpo" else "labels"
    assert batch["pixel_values"].shape == (8, 3, 28, 28, 3)
    assert ((batch[key] >= 0).sum(1) > 0).all()


def test_tokenizer_round_trips(built):
    tok = load_tokenizer(built["tokenizer"])
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (1, 2, 3, 4)
    with open(built["text_corpus"], encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 2 * SIZES["train"]
    for line in lines[:200]:
        ids = tok.encode(line)
        assert tok.decode(ids) == line
        assert 0 not in ids  # nothing unknown
        assert len(ids) < len(line) / 2  # merges were learnt
    text = "<image>\nhow many squares are there? ünïcode ✓"
    ids = tok.encode(text, add_bos=True)
    assert ids[:2] == [1, 4] and tok.decode(ids[1:]) == text and 0 not in ids


def test_tokenizer_vocabulary_too_large(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red circle.\n")
    with pytest.raises(ValueError, match="tokenizer"):
        S.train_tokenizer(corpus, tmp_path / "tok", vocab_size=100)


# ---- TFDS and out-of-world images ---------------------------------------------------------
def test_tfds_builder_round_trips(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from mllm_jax.demo import shapes_tfds

    sizes = {"train": 6, "val": 4}
    builder = shapes_tfds.make_builder(sizes, seed=2, data_dir=tmp_path)
    builder.download_and_prepare()
    for split, n in sizes.items():
        scenes = S.make_split(split, n, seed=2)
        stats = S.statistics(scenes)
        got = list(shapes_tfds.examples(builder, split))
        assert [g["id"] for g in got] == [s.id for s in scenes]
        for i, (g, s) in enumerate(zip(got, scenes)):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(g["image"]))), s.image)
            assert [(o["name"], o["size"], o["bbox"]) for o in g["objects"]] == \
                [(o.name, o.size, o.bbox) for o in s.objects]
            assert [o["position"] for o in g["objects"]] == \
                [WORLD.cell_name(o.cell) for o in s.objects]
            assert g["detailed_caption"] == S.detailed_caption(s.objects)
            rec = S.instruct_record(s, 2, split, i, stats=stats)
            assert [(q["question"], q["answer"]) for q in g["questions"]] == \
                [(q["value"].replace("<image>\n", ""), a["value"])
                 for q, a in zip(rec["conversations"][::2], rec["conversations"][1::2])]
            assert len(g["pope"]) == 6 * min(3, len(set(s.names)))
    records = list(shapes_tfds.pipeline_records(builder, "val", "captions"))
    assert records[0].images[0].path == "images/val/000000.png"
    assert check_conversation(records[0].conversations, 1, records[0].id) is None


def test_out_of_world_images():
    try:
        import skimage  # noqa: F401
        available = True
    except ImportError:
        try:
            import sklearn  # noqa: F401
            available = True
        except ImportError:
            available = False
    if available:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            photos = S.out_of_world_images(24)
        assert photos and all(p.shape == (24, 24, 3) and p.dtype == np.uint8 for _, p in photos)
    else:
        with pytest.warns(UserWarning, match="scikit-image"):
            assert S.out_of_world_images(24) == []


def test_world_validation():
    with pytest.raises(ValueError, match="colours"):
        S.World(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="grid"):
        S.World(grid=4)
    with pytest.raises(ValueError, match="jitter must be in"):
        S.World(jitter=1.5)
    with pytest.raises(ValueError, match="objects per scene"):
        S.World(grid=2, max_objects=4)
