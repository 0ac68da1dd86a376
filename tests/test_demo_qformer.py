"""`mllm-jax demo --connector qformer` at its "test" scale: every phase runs (the Q-Former's
stage-1 pre-training with held-out retrieval, stages 1 and 2 with the Q-Former connector,
their evaluations), the report and metrics are written, and the numbers are in range."""
import json
import os

import flax
import numpy as np
import pytest

from mllm_jax.demo import configs, report, run
from mllm_jax.train import recipe

STAGES = [name for name, *_ in configs.QFORMER_STAGES]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run(str(tmp_path_factory.mktemp("demo_qformer")), scale="test", progress=False,
               connector="qformer")


def test_every_phase_runs_and_the_metrics_are_in_range(result):
    assert result["connector"] == "qformer"
    assert list(result["metrics"]) == STAGES
    for phase in ["data", "contrastive pre-training", "language-model pre-training",
                  "Q-Former pre-training"] + STAGES + [f"evaluate {s}" for s in STAGES]:
        assert phase in result["times"], phase
    for name in STAGES:
        m = result["metrics"][name]
        for key in ("vqa_mean", "vqa_existence", "vqa_count", "vqa_colour", "pope_random_f1",
                    "pope_popular_f1", "pope_adversarial_f1", "chair_i", "chair_s"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert m["cider"] >= 0.0
    q = result["pretrain"]["qformer"]
    s = result["settings"]
    for key in ("i2t_r1", "t2i_r1"):
        assert 0.0 <= q[key] <= 1.0, (key, q[key])
    # One held-out pair per scene; the candidates are the distinct captions.
    assert q["images"] == s.eval_scenes and 2 <= q["candidates"] <= s.eval_scenes
    assert q["chance"] == pytest.approx(1 / q["candidates"])
    for key in ("loss_itc", "loss_itm", "loss_itg"):
        assert np.isfinite(q[key]) and q[key] > 0, (key, q[key])


def test_the_stages_train_the_q_former_that_stage_1_pre_trained(result):
    """The LLaVA stages start from the pre-trained Q-Former (not a random one), stage 1
    trains only the connector, and the LLM trains in stage 2 as `QFORMER_STAGES` says."""
    from mllm_jax.convert import load_orbax
    from mllm_jax.models import blip2_qformer  # noqa: F401  (registers the stage-1 family)
    workdir = result["paths"]["workdir"]
    flat = {}
    for part in ("init", "stage1/final", "stage2/final"):
        _, params = load_orbax(os.path.join(workdir, part))
        flat[part] = flax.traverse_util.flatten_dict(params, sep="/")
    init, s1, s2 = flat["init"], flat["stage1/final"], flat["stage2/final"]
    _, pre = load_orbax(os.path.join(workdir, "qformer", "train", "final"))
    pre = flax.traverse_util.flatten_dict(pre, sep="/")
    qformer = [k for k in init if k.startswith("multi_modal_projector/qformer/")]
    assert qformer
    for k in qformer + ["multi_modal_projector/query_tokens"]:
        np.testing.assert_array_equal(init[k], pre[k[len("multi_modal_projector/"):]], k)
    # The stage-1 phase trained the Q-Former, not the ViT it read.
    _, first = load_orbax(os.path.join(workdir, "qformer", "init"))
    first = flax.traverse_util.flatten_dict(first, sep="/")
    assert not np.array_equal(first["query_tokens"], pre["query_tokens"])
    for k in first:
        if k.startswith("vision_model/"):
            np.testing.assert_array_equal(first[k], pre[k], k)
            np.testing.assert_array_equal(
                first[k], init["vision_tower/" + k[len("vision_model/"):]], k)
    # Stage 1 changes the connector, and only the connector.
    changed = {k for k in init if not np.array_equal(init[k], s1[k])}
    assert changed and all(k.startswith("multi_modal_projector/") for k in changed), changed
    assert "multi_modal_projector/query_tokens" in changed
    spec = {n: t for n, t, *_ in configs.QFORMER_STAGES}
    llm_trains = recipe.LLM in spec["stage2"]
    llm = [k for k in s1 if k.startswith("language_model/")]
    assert any(not np.array_equal(s1[k], s2[k]) for k in llm) == llm_trains
    assert all(np.array_equal(s1[k], s2[k]) for k in s1 if k.startswith("vision_tower/"))
    # The stages train the queries and Q-Former at `qformer_lr`, the projection at theirs.
    s = result["settings"]
    for name in STAGES:
        cfg = configs.stage_config(s, name, configs.model_config(s, 0, "qformer"), "data", "tok",
                                   "init", connector="qformer")
        assert [list(g) for g in cfg.train.lr_groups] == [
            ["qformer", configs.QFORMER_PARAMS, s.qformer_lr]]
    import re
    slow = {k for k in init if re.search(configs.QFORMER_PARAMS, k)}
    assert set(qformer) | {"multi_modal_projector/query_tokens"} == slow
    # Its stage-1 phase read one pair per object, the objects' region phrases.
    pairs = json.load(open(os.path.join(workdir, "qformer", "pairs_train.json")))
    world = json.load(open(os.path.join(workdir, "data", "pairs_train.json")))
    assert s.qformer_pretrain_texts == "phrases"
    assert [p["caption"] for p in pairs] == [r["phrase"] + "." for e in world
                                             for r in e["regions"]]


def test_the_report_shows_the_q_former_phases_and_numbers(result):
    paths = result["paths"]
    text = open(paths["report"]).read()
    assert "Q-Former" in text and report.table(result["metrics"]) in text
    q = result["pretrain"]["qformer"]
    assert f"{q['i2t_r1']:.3f}" in text and f"{q['chance']:.3f}" in text
    for what, value, met in report.targets(result["metrics"], result["total"],
                                           result["pretrain"]):
        assert f"| {what} | {value} | {'yes' if met else '**no**'} |" in text
    for phase in result["times"]:
        assert f"| {phase} |" in text
    saved = json.load(open(paths["metrics"]))
    assert saved["connector"] == "qformer" and saved["metrics"] == result["metrics"]
    assert saved["pretrain"]["qformer"]["i2t_r1"] == q["i2t_r1"]


def test_the_q_former_recipes_compare_connectors_on_the_llava_recipes_data():
    """configs/llava_qformer_tiny_stage{1,2}.py: tiny-llava's towers and data with 8 queries
    in place of its 16 patch tokens; stage 1 trains the connector, stage 2 the LLM too."""
    from mllm_jax.models import tokens_per_image
    from mllm_jax.train import config_file
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    load = lambda name: config_file.load(os.path.join(repo, "configs", f"{name}.py"))  # noqa: E731
    llava, s1, s2 = (load("llava15_tiny_stage1"), load("llava_qformer_tiny_stage1"),
                     load("llava_qformer_tiny_stage2"))
    assert s1.model.projector.type == s2.model.projector.type == "qformer"
    assert tokens_per_image(s1.model) == s1.model.image_seq_length == 8
    assert tokens_per_image(llava.model) == 16
    assert s1.data.to_dict() == llava.data.to_dict() == s2.data.to_dict()
    assert s1.model.vision.to_dict() == llava.model.vision.to_dict()
    assert s1.model.text.to_dict() == llava.model.text.to_dict()
    assert s1.model.projector.encoder_hidden_size == llava.model.vision.hidden_size
    assert list(s1.stage.trainable) == [recipe.PROJECTOR]
    assert list(s2.stage.trainable) == [recipe.PROJECTOR, recipe.LLM]
    assert s2.model.to_dict() == s1.model.to_dict()


def test_pretrain_pairs_texts(tmp_path):
    """Captions, region phrases (one pair per object, ids `{image}-r{k}`, the image's
    path kept so its pairs share an image id), or both; a file without regions or an
    unknown choice is refused by name."""
    from mllm_jax.demo.qformer import pretrain_pairs
    src = tmp_path / "pairs_train.json"
    src.write_text(json.dumps([
        {"id": "a", "image": "images/a.png", "caption": "a red circle and a blue square.",
         "regions": [{"box": [0, 0, 4, 4], "phrase": "a small red circle"},
                     {"box": [4, 4, 8, 8], "phrase": "a large blue square"}]},
        {"id": "b", "image": "images/b.png", "caption": "a green cross.",
         "regions": [{"box": [0, 0, 4, 4], "phrase": "a small green cross"}]}]))

    def read(texts):
        out = pretrain_pairs(str(src), texts, str(tmp_path / texts / "pairs.json"))
        return [(e["id"], e["image"], e["caption"]) for e in json.load(open(out))]

    assert read("captions") == [("a", "images/a.png", "a red circle and a blue square."),
                                ("b", "images/b.png", "a green cross.")]
    phrases = [("a-r0", "images/a.png", "a small red circle."),
               ("a-r1", "images/a.png", "a large blue square."),
               ("b-r0", "images/b.png", "a small green cross.")]
    assert read("phrases") == phrases
    both = read("both")
    assert both[0] == ("a", "images/a.png", "a red circle and a blue square.")
    assert sorted(both) == sorted(read("captions") + phrases)
    with pytest.raises(ValueError, match="qformer_pretrain_texts='regions'"):
        read("regions")
    src.write_text(json.dumps([{"id": "a", "image": "images/a.png", "caption": "x."}]))
    with pytest.raises(ValueError, match=r"entry 0 \(a\) has no regions"):
        read("phrases")
