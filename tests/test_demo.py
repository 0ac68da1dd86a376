"""The demo at its "test" scale: every phase runs, the report and plot are written, and
instruction tuning (stage 2) beats caption alignment (stage 1) on held-out VQA."""
import json
import os

import pytest
from PIL import Image

from mllm_jax.demo import configs, evaluate, report, run
from mllm_jax.infer import read_chat_template


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run(str(tmp_path_factory.mktemp("demo")), scale="test", progress=False)


def test_every_phase_runs_and_stage2_beats_stage1_on_vqa(result):
    stages = [name for name, *_ in configs.STAGES]
    assert list(result["metrics"]) == stages
    for phase in ["data", "contrastive pre-training", "language-model pre-training"] + \
            stages + [f"evaluate {s}" for s in stages]:
        assert phase in result["times"], phase
    for name in stages:
        m = result["metrics"][name]
        for key in ("vqa_mean", "vqa_existence", "vqa_count", "vqa_colour", "pope_random_f1",
                    "pope_popular_f1", "pope_adversarial_f1", "chair_i", "chair_s", "cider"):
            assert key in m and 0.0 <= m[key], (name, key)
        final = os.path.join(result["paths"]["workdir"], name, "final")
        assert os.path.exists(os.path.join(final, "model_config.json"))
        # Each stage's export records the conversation template it was trained with.
        assert read_chat_template(final).name == "mistral"
    # Stage 3's pairs: the world's caption and yes/no pairs, then the model's own.
    pairs = json.load(open(os.path.join(result["paths"]["workdir"], "stage3_pairs",
                                        "preference.json")))
    counts = result["pretrain"]["stage3_pairs"]
    s = result["settings"]
    assert counts["world_pairs"] == s.world_pairs and counts["yesno_pairs"] == s.yesno_pairs
    assert len(pairs) == s.world_pairs + s.yesno_pairs + counts["own_hallucinations"]
    assert sum(p["id"].endswith("-yesno") for p in pairs) == s.yesno_pairs
    assert sum(p["id"].endswith("-own") for p in pairs) == counts["own_hallucinations"]
    print({s: round(result["metrics"][s]["vqa_mean"], 3) for s in stages}, result["times"])
    assert result["metrics"]["stage2"]["vqa_mean"] > result["metrics"]["stage1"]["vqa_mean"]


def test_report_states_the_seed_and_the_table_and_the_plot_is_a_png(result):
    paths = result["paths"]
    text = open(paths["report"]).read()
    assert f"Seed: **{result['settings'].seed}**" in text
    assert report.table(result["metrics"]) in text
    assert os.path.basename(paths["plot"]) in text
    for what, value, met in report.targets(result["metrics"], result["total"]):
        assert f"| {what} | {value} | {'yes' if met else '**no**'} |" in text
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size[0] >= 400
    saved = json.load(open(paths["metrics"]))
    assert saved["metrics"] == result["metrics"]
    # One answer per scored question per stage.
    entries = evaluate.eval_entries(os.path.join(paths["workdir"], "data"), "val")
    for stage in result["metrics"]:
        lines = open(os.path.join(paths["workdir"], "eval", f"{stage}.jsonl")).readlines()
        assert [json.loads(l)["id"] for l in lines] == [e["id"] for e in entries]
    assert {e["kind"] for e in entries} >= {"existence", "count", "colour", "pope", "detail",
                                            "caption"}


def test_the_final_model_is_a_checkpoint_chat_reads(result):
    """`model/` is an HF checkpoint with the world's tokenizer: a chat session on it gives
    the stage-3 evaluation's answer to a held-out question."""
    from mllm_jax.convert import load_hf
    from mllm_jax.infer.prompting import Session
    paths = result["paths"]
    entries = evaluate.eval_entries(os.path.join(paths["workdir"], "data"), "val")
    k, entry = next((k, e) for k, e in enumerate(entries)
                    if e["kind"] not in evaluate.LONG_KINDS)
    question = entry["conversations"][0]["value"]
    assert question.startswith("<image>\n")
    with open(os.path.join(paths["workdir"], "eval", "stage3.jsonl")) as f:
        recorded = json.loads(f.readlines()[k])
    assert recorded["id"] == entry["id"]
    model, params = load_hf(paths["model"])
    session = Session(model, params, paths["model"], evaluate.TEMPLATE,
                      max_new_tokens=result["settings"].short_new_tokens)
    image = os.path.join(paths["workdir"], "data", entry["image"])
    assert session.ask(question[len("<image>\n"):], [image]) == recorded["prediction"]


def test_eval_on_the_exported_model_gives_the_reports_pope_scores(result, tmp_path, capsys):
    """`model/` records the template it was trained with (mistral, bare questions), so
    `mllm-jax eval` on the held-out POPE questions the demo writes (data/pope_val/) asks
    what the demo's own evaluation asked, answers as it did, and gives the report's F1."""
    from mllm_jax.cli import main
    from mllm_jax.infer.chat_template import read_chat_template
    paths = result["paths"]
    recorded = read_chat_template(paths["model"])
    assert (recorded.name, recorded.prompt_suffixes) == (evaluate.TEMPLATE,
                                                         evaluate.PROMPT_SUFFIXES)
    assert "[INST]" in json.load(open(os.path.join(paths["model"], "tokenizer_config.json"))
                                 )["chat_template"]
    data_dir = os.path.join(paths["workdir"], "data")
    assert main(["eval", "--ckpt", paths["model"], "--task", "pope", "--data", paths["pope"],
                 "--image-root", data_dir, "--output", str(tmp_path)]) == 0
    capsys.readouterr()
    (sub,) = os.listdir(tmp_path)
    files = sorted(os.listdir(tmp_path / sub))
    results = json.load(open(tmp_path / sub / next(f for f in files if "results" in f)))
    scores = results["results"]["pope"]
    for mode in ("random", "popular", "adversarial"):
        assert scores[f"pope_{mode}_f1_score,none"] == pytest.approx(
            result["metrics"]["stage3"][f"pope_{mode}_f1"], abs=1e-12), mode
    with open(os.path.join(paths["workdir"], "eval", "stage3.jsonl")) as f:
        demo_answers = {r["id"]: r["prediction"] for r in map(json.loads, f)}
    with open(tmp_path / sub / next(f for f in files if f.endswith("_pope.jsonl"))) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == sum(e["kind"] == "pope" for e in evaluate.eval_entries(data_dir))
    for s in samples:
        assert s["resps"][0] == demo_answers[s["doc"]["sample_id"]], s["input"]
