"""`mllm-jax demo`: the whole LLaVA recipe on the shapes world, on a CPU.

Phases: build the data (`shapes.write_dataset`); contrastive pre-training of the ViT on
image-caption and region-phrase pairs; language-model pre-training of the LLM on the world's
text; the initial LLaVA (pre-trained towers, random projector) saved as an orbax checkpoint; stage 1
(projector on captions), stage 2 (projector + LLM on instructions), stage 3
(DPO on the world's preference pairs and on the stage-2 model's own hallucinations), each
followed by an evaluation on the held-out split; the final model's descriptions of a few
real photographs (`demo.photos`); then report.md and metrics.png. Every phase
is seeded from `Settings.seed`.

With `connector="qformer"` (`demo.qformer`) a Q-Former replaces the MLP projector: its
stage-1 pre-training (qformer/) runs after the towers', and the LLaVA stages are 1 and 2.

Layout of the workdir: data/ (the world; data/pope_val/ its held-out POPE questions as
POPE's question files, for `mllm-jax eval --task pope`), init/ (the initial LLaVA), stage1/ ..
stage3/ (each a training workdir whose final/ is the stage's checkpoint), stage3_pairs/
(the DPO pairs), eval/ (answers per stage), model/ (the final model, an HF checkpoint),
photos/ (the real photographs it describes in the report), train_log.txt, report.md,
metrics.png, metrics.json, and the MARKER file that makes the directory a demo workdir.
"""
from __future__ import annotations

import json
import os
import shutil

import flax
import jax
import numpy as np

from mllm_jax import config as mc
from mllm_jax.convert.hf_io import abstract_params, save_hf
from mllm_jax.convert.orbax_io import save_orbax
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.demo import configs, evaluate as ev, photos, preference, report, shapes
from mllm_jax.demo.progress import Progress
from mllm_jax.infer.chat_template import write_chat_template
from mllm_jax.models import build_model
from mllm_jax.train.loop import train

FILES = ("train_log.txt", "report.md", "metrics.png", "metrics.json")
# Written into a workdir the demo has claimed; a non-empty directory without it is the user's.
MARKER = ".mllm_jax_demo"
PARTS = ("data", "init", "qformer", "stage1", "stage2", "stage3", "stage3_pairs", "eval",
         "model", "photos")


def random_params(model, seed: int):
    """N(0, 0.02) weights, unit norm scales, zero biases, drawn with numpy from the abstract
    parameter tree (cheaper than compiling `model.init` for a throw-away tree)."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(abstract_params(model))
    out = {}
    for path, leaf in flat.items():
        if path[-1] == "scale":
            out[path] = np.ones(leaf.shape, leaf.dtype)
        elif path[-1] == "bias":
            out[path] = np.zeros(leaf.shape, leaf.dtype)
        else:
            out[path] = (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return flax.traverse_util.unflatten_dict(out)


def build_data(s: configs.Settings, data_dir: str) -> dict:
    return shapes.write_dataset(data_dir, {"train": s.train_scenes, "val": s.eval_scenes},
                                seed=s.seed, world=configs.world(s),
                                weights=dict(s.instruct_weights), turns=s.instruct_turns,
                                fewshot_fraction=0.0,
                                tokenizer_vocab_size=s.vocab_size)


def pretrain_vision(s, model_cfg, paths, progress):
    """The ViT's parameters after contrastive pre-training, and its metrics."""
    from mllm_jax.pretrain.contrastive import pretrain_contrastive
    run = s.contrastive
    res = pretrain_contrastive(
        paths["pairs_train"], paths["tokenizer"], val=paths["pairs_val"],
        vision_config=mc.clip_vision_model_config(model_cfg.vision), steps=run.steps,
        batch_size=run.batch, lr=run.lr, warmup_ratio=run.warmup, seed=s.seed,
        region_weight=s.region_weight, region_layer=model_cfg.vision_feature_layer,
        progress=lambda step, loss: progress.update(step - progress.count, loss=f"{loss:.3f}"),
        log_every=max(1, run.steps // 50))
    metrics = {k: v for k, v in res.metrics.items() if k != "losses"}
    metrics["final_loss"] = res.metrics["losses"][-1]
    return jax.device_get(res.vision_params), metrics


def pretrain_text(s, model_cfg, paths, progress):
    """The LLM's parameters after language-model pre-training on the world's text, and its
    metrics."""
    from mllm_jax.pretrain.text_lm import pretrain_lm
    run = s.text_lm
    res = pretrain_lm(
        paths["text_corpus"], paths["tokenizer"], config=mc.llm_config(model_cfg.text),
        seq_len=run.max_length, steps=run.steps, batch_size=run.batch, lr=run.lr,
        warmup_ratio=run.warmup, seed=s.seed,
        progress=lambda step, loss: progress.update(step - progress.count, loss=f"{loss:.3f}"),
        log_every=max(1, run.steps // 50))
    metrics = {k: v for k, v in res.metrics.items() if k != "losses"}
    metrics["final_loss"] = res.metrics["losses"][-1]
    return jax.device_get(res.params), metrics


def stage3_pairs(s, model, params, tokenizer, paths, workdir, progress):
    """The first `world_pairs` of the world's caption preference pairs and `yesno_pairs` of
    its existence-question pairs, plus the stage-2 model's own hallucinations on the (other)
    training images, written to stage3_pairs/preference.json."""
    records = preference.read_records(paths["preference_train"])
    world = records[:s.world_pairs]
    yesno = preference.read_records(paths["preference_yesno_train"])[:s.yesno_pairs]
    described = records[s.world_pairs:s.world_pairs + s.on_policy_scenes]
    own = preference.on_policy_pairs(model, params, tokenizer, os.path.dirname(
        paths["preference_train"]), described, batch_size=s.eval_batch,
        max_new_tokens=s.long_new_tokens, progress=progress.update) if described else []
    out_dir = os.path.join(workdir, "stage3_pairs")
    os.makedirs(out_dir, exist_ok=True)
    path = preference.write_records(os.path.join(out_dir, "preference.json"),
                                    world + yesno + own)
    return path, {"world_pairs": len(world), "yesno_pairs": len(yesno),
                  "own_hallucinations": len(own), "described": len(described)}


def initial_llava(s, model, vision, text, out_dir, connector=None) -> str:
    """The LLaVA of pre-trained towers (`vision`, `text`) and a random connector, or the
    connector `connector(params)` puts in (a pre-trained Q-Former); saved as an orbax
    checkpoint in `out_dir`."""
    params = random_params(model, s.seed)
    if vision is not None:
        params["vision_tower"] = vision
    if text is not None:
        params["language_model"] = text
    if connector is not None:
        params = connector(params)
    return save_orbax(model, params, out_dir, overwrite=True)


def export_model(model, params, tokenizer_dir, out_dir) -> str:
    """The final model as an HF checkpoint directory with its tokenizer and the template it
    was trained with (`ev.TEMPLATE`, questions without answer-format instructions), which
    `mllm-jax chat/generate/eval --ckpt` and transformers read."""
    save_hf(model, params, out_dir)
    for name in os.listdir(tokenizer_dir):
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    write_chat_template(out_dir, ev.TEMPLATE, prompt_suffixes=ev.PROMPT_SUFFIXES)
    return out_dir


def claim_workdir(workdir: str, overwrite: bool = False) -> str:
    """Makes `workdir` the demo's: a new or empty directory, one an earlier demo run claimed
    (it holds MARKER), or, with `overwrite`, any directory. Writes MARKER there. A non-empty
    directory without MARKER is refused (FileExistsError) before anything is written, since
    the demo replaces its subdirectories (data/, model/, ...)."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FileExistsError(f"demo workdir {workdir} is a file, not a directory; choose "
                              f"a new or empty directory")
    marker = os.path.join(workdir, MARKER)
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.isfile(marker) \
            and not overwrite:
        raise FileExistsError(
            f"demo workdir {workdir} is not empty and no earlier demo run created it (it has "
            f"no {MARKER} file); the demo replaces its {', '.join(PARTS)} subdirectories and "
            f"its {', '.join(FILES)} files there. Choose an empty or new directory, or pass "
            f"--overwrite (run(..., overwrite=True)) to let it")
    os.makedirs(workdir, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as f:
        f.write("This directory is an `mllm-jax demo` workdir: a new demo run here replaces "
                "its demo subdirectories and files.\n")
    return workdir


def _clean(workdir):
    """Removes what an earlier demo run wrote (training would resume from its checkpoints)."""
    for part in PARTS:
        path = os.path.join(workdir, part)
        if os.path.isdir(path):
            shutil.rmtree(path)
    for name in FILES:
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            os.remove(path)


def run(workdir: str = "mllm_jax_demo", scale="default", seed: int | None = None,
        progress: bool = True, overwrite: bool = False, connector: str = "mlp") -> dict:
    """Runs every phase in `workdir` (its demo subdirectories are replaced). `workdir` must be
    new, empty or an earlier demo run's (`claim_workdir`); `overwrite` lets the demo use any
    other directory too (replacing its data/, model/, ... subdirectories). `connector`
    "qformer" puts a Q-Former between the towers (`demo.qformer`): its stage-1 pre-training
    runs before the LLaVA stages, which are then stages 1 and 2 (no DPO). Returns
    {settings, metrics: {stage: {metric: value}}, times: {phase: seconds}, total (seconds),
    pretrain (metrics of the pre-training phases), paths: {report, plot, metrics, workdir}}."""
    s = configs.settings_for(scale, seed)
    stages = configs.CONNECTORS.get(connector)
    if stages is None:
        raise ValueError(f"unknown demo connector {connector!r}; known: "
                         f"{list(configs.CONNECTORS)}")
    workdir = claim_workdir(workdir, overwrite)
    _clean(workdir)
    p = Progress(progress)
    p.line(f"mllm-jax demo: scale {scale if isinstance(scale, str) else 'custom'}, seed "
           f"{s.seed}, connector {connector}, workdir {workdir}")
    data_dir = os.path.join(workdir, "data")
    with p.phase("data"):
        paths = build_data(s, data_dir)
    tokenizer = load_tokenizer(paths["tokenizer"])
    model_cfg = configs.model_config(s, tokenizer.token_id(shapes.IMAGE_TOKEN), connector)
    model = build_model(model_cfg)
    pre = {}
    with p.phase("contrastive pre-training", total=s.contrastive.steps):
        vision, pre["contrastive"] = pretrain_vision(s, model_cfg, paths, p)
    with p.phase("language-model pre-training", total=s.text_lm.steps):
        text, pre["text_lm"] = pretrain_text(s, model_cfg, paths, p)
    pretrained_connector = None
    if connector == "qformer":
        from mllm_jax.demo import qformer
        pretrained_connector, pre["qformer"] = qformer.pretrain_phase(s, model_cfg, vision,
                                                                      paths, workdir, p)
    init_dir = initial_llava(s, model, vision, text, os.path.join(workdir, "init"),
                             pretrained_connector)
    entries = ev.eval_entries(data_dir, "val")
    pope_dir = ev.write_pope_files(entries, data_dir, os.path.join(data_dir, "pope_val"))
    log_path = os.path.join(workdir, "train_log.txt")
    metrics = {}
    params, json_path = None, None
    for name, *_ in stages:
        if name == "stage3":
            with p.phase("stage3 pairs", total=s.on_policy_scenes, unit="image"):
                json_path, pre["stage3_pairs"] = stage3_pairs(s, model, params, tokenizer,
                                                              paths, workdir, p)
        cfg = configs.stage_config(s, name, model_cfg, data_dir, paths["tokenizer"], init_dir,
                                   json_path if name == "stage3" else None, connector)
        stage_dir = os.path.join(workdir, name)
        with p.phase(name, total=cfg.train.num_steps), open(log_path, "a") as log:
            summary = train(cfg, stage_dir,
                            log=lambda msg, f=log, n=name: print(f"{n}: {msg}", file=f),
                            on_step=lambda step, m: p.update(1, loss=f"{m['loss']:.3f}"))
        params = jax.device_get(summary["final_params"])
        init_dir = os.path.join(stage_dir, "final")
        with p.phase(f"evaluate {name}", total=len(entries), unit="question"):
            metrics[name], answers = ev.evaluate(
                model, params, tokenizer, entries, data_dir, world=configs.world(s),
                batch_size=s.eval_batch,
                short_new_tokens=s.short_new_tokens, long_new_tokens=s.long_new_tokens,
                progress=p.update)
        _write_answers(os.path.join(workdir, "eval", f"{name}.jsonl"), entries, answers)
        p.line(f"{name}: " + ", ".join(f"{k} {metrics[name][k]:.3f}" for k in report.HEADLINE
                                       if k in metrics[name]))
    if connector == "mlp":
        model_dir = export_model(model, params, paths["tokenizer"],
                                 os.path.join(workdir, "model"))
    else:  # no HF class holds a LLaVA with a Q-Former: the last stage's orbax export is it
        model_dir = init_dir
    with p.phase("out-of-world photos"):
        described = photos.describe(model, params, tokenizer, os.path.join(workdir, "photos"),
                                    max_new_tokens=s.long_new_tokens)
    total = p.elapsed()
    out = report.write(workdir, s, metrics, dict(p.times), pre, total=total,
                       cpu_times=dict(p.cpu_times), photos=described, connector=connector)
    p.line(f"report: {out['report']}")
    p.line(f"plot: {out['plot']}")
    if connector == "mlp":
        p.line(f"model: {model_dir} (try: mllm-jax chat --ckpt {model_dir}; or mllm-jax eval "
               f"--ckpt {model_dir} --task pope --data {pope_dir} --image-root {data_dir})")
    else:
        p.line(f"model: {model_dir} (an orbax checkpoint: mllm_jax.convert.load_orbax)")
    return {"settings": s, "connector": connector, "metrics": metrics, "times": dict(p.times),
            "photos": described, "cpu_times": dict(p.cpu_times), "total": total, "pretrain": pre,
            "paths": {**out, "workdir": workdir, "model": model_dir, "pope": pope_dir}}


def _write_answers(path, entries, answers):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e, a in zip(entries, answers):
            f.write(json.dumps({"id": e["id"], "kind": e["kind"], "answer": e["answer"],
                                "prediction": a}) + "\n")
