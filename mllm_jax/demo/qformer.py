"""`mllm-jax demo --connector qformer`: BLIP-2's recipe on the shapes world.

The same world and the same pre-trained ViT and LLM as the LLaVA demo; between them a
Q-Former (`configs.qformer_config`) whose `qformer_queries` outputs replace the ViT's patch
tokens in the LLM's input. Phases after the towers' pre-training:

1. Q-Former stage-1 representation pre-training (`pretrain_phase`, workdir qformer/): the
   queries learn to read the frozen ViT's features with BLIP-2's image-text contrastive,
   matching and image-grounded generation losses (`train.blip2_stage1`) on the world's
   objects and their region phrases (`pretrain_pairs`, `Settings.qformer_pretrain_texts`);
   scored by held-out image-to-text retrieval of whole captions (R@1 against chance,
   1 / candidates).
2. Stage 1, BLIP-2's generative pre-training: the demo's caption stage with the Q-Former
   connector initialised from phase 1 (`blip2_qformer.copy_qformer`), the Q-Former and its
   `language_projection` trained (the queries and Q-Former at `Settings.qformer_lr`), ViT
   and LLM frozen.
3. Stage 2, instruction tuning on the world's instructions (`configs.QFORMER_STAGES` says
   what trains, and why).

Each LLaVA stage is evaluated on the held-out split as in the LLaVA demo.
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from mllm_jax.train import recipe

STAGE1_TRAINABLE = r"^(?!vision_model/)"  # everything but the ViT


def stage1_model_config(s, model_cfg) -> ml_collections.ConfigDict:
    """The `blip2_qformer` config of the stage-1 phase: the LLaVA model's ViT and its
    features exactly as the connector reads them (the same layer and tokens, no LAVIS
    `ln_vision`, which the LLaVA model would not apply), the connector's Q-Former with text
    feed-forward weights, the world's vocabulary plus BLIP-2's decoder token."""
    from mllm_jax.models.blip2_qformer import blip2_qformer_config
    q = ml_collections.ConfigDict(model_cfg.projector.to_dict())
    del q["type"]
    q.update(model_type="blip_2_qformer", use_qformer_text_input=True,
             vocab_size=s.vocab_size + 1, encoder_hidden_size=model_cfg.vision.hidden_size)
    from mllm_jax.models.connectors.qformer import qformer_config
    return blip2_qformer_config(
        vision=ml_collections.ConfigDict(model_cfg.vision.to_dict()),
        qformer=qformer_config(**q.to_dict()),
        vision_feature_layer=model_cfg.vision_feature_layer,
        vision_feature_select_strategy=model_cfg.vision_feature_select_strategy,
        ln_vision=False, image_text_hidden_size=s.qformer_hidden, dec_token_id=s.vocab_size)


PRETRAIN_TEXTS = ("phrases", "captions", "both")


def pretrain_pairs(pairs_path: str, texts: str, out_path: str) -> str:
    """The stage-1 pairs file at `out_path` from the world's pairs file (`pairs_{split}.json`,
    images relative to its directory): for `texts` "captions" each image with its caption;
    "phrases" each object's region phrase as a pair of its own (id `{image id}-r{k}`), so
    the image-text contrastive loss, a maximum over the queries, matches every object
    against some query; "both" the two. The pairs of one image share its image id
    (`data.pairs`), so they are positives of each other, never negatives."""
    import json
    if texts not in PRETRAIN_TEXTS:
        raise ValueError(f"demo setting qformer_pretrain_texts={texts!r}; use one of "
                         f"{list(PRETRAIN_TEXTS)}")
    from mllm_jax.demo.files import read_pairs
    read_pairs(pairs_path, regions=texts != "captions")  # checks the file, names bad entries
    with open(pairs_path, encoding="utf-8") as f:
        entries = json.load(f)
    out = []
    for e in entries:
        if texts != "phrases":
            out.append({"id": e["id"], "image": e["image"], "caption": e["caption"]})
        if texts != "captions":
            out.extend({"id": f"{e['id']}-r{k}", "image": e["image"],
                        "caption": r["phrase"] + "."} for k, r in enumerate(e["regions"]))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return out_path


def stage1_config(s, model_cfg, paths, init_dir) -> ml_collections.ConfigDict:
    """The `train.loop.train` config of the Q-Former's stage-1 pre-training on
    `paths["qformer_pairs_train"]` (images under the directory of `paths["pairs_train"]`)."""
    run = s.qformer_pretrain
    c = recipe.base("tiny-llava")
    c.model = stage1_model_config(s, model_cfg)
    c.init.orbax_checkpoint = init_dir
    c.stage.update(name="qformer_stage1", trainable=[STAGE1_TRAINABLE],
                   objective="blip2_stage1")
    c.train.update(lr=run.lr, warmup_ratio=run.warmup, weight_decay=0.05)
    c.train.update(global_batch_size=run.batch, num_steps=run.steps, seed=s.seed,
                   log_every=max(1, run.steps // 10), checkpoint_every=run.steps + 1,
                   keep_checkpoints=1, async_checkpointing=False, export_final=True)
    c.data.update(source="llava_json", json=paths["qformer_pairs_train"],
                  image_root=os.path.dirname(paths["pairs_train"]),
                  tokenizer=paths["tokenizer"], max_length=run.max_length, workers=2,
                  images=1, seed=s.seed)
    return c


def pretrain_phase(s, model_cfg, vision, paths, workdir, progress):
    """Q-Former stage-1 pre-training in `workdir`/qformer (init/: the initial stage-1 model,
    pairs_train.json: its pairs, train/: its training workdir) with the ViT `vision` frozen,
    then held-out retrieval of the captions.
    Returns (a function that puts the trained `query_tokens` and `qformer` into a LLaVA
    parameter tree with the Q-Former connector; metrics: `i2t_r1`, `t2i_r1`, `chance`,
    `candidates`, the mean of the last tenth of the steps' losses)."""
    from mllm_jax.convert.orbax_io import save_orbax
    from mllm_jax.data.tokenizer import load_tokenizer
    from mllm_jax.demo.pipeline import random_params
    from mllm_jax.models import build_model
    from mllm_jax.models.blip2_qformer import copy_qformer
    from mllm_jax.train.loop import train

    cfg1 = stage1_model_config(s, model_cfg)
    model = build_model(cfg1)
    params = random_params(model, s.seed)
    params["temp"] = np.asarray(cfg1.temp_init, np.float32)
    params["vision_model"] = vision
    root = os.path.join(workdir, "qformer")
    init_dir = save_orbax(model, params, os.path.join(root, "init"), overwrite=True)
    paths = {**paths, "qformer_pairs_train": pretrain_pairs(
        paths["pairs_train"], s.qformer_pretrain_texts, os.path.join(root, "pairs_train.json"))}
    cfg = stage1_config(s, model_cfg, paths, init_dir)
    run, history = s.qformer_pretrain, []

    def on_step(step, m):
        history.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
        progress.update(1, loss=f"{float(m['loss']):.3f}")

    with progress.phase("Q-Former pre-training", total=run.steps), \
            open(os.path.join(workdir, "train_log.txt"), "a") as log:
        summary = train(cfg, os.path.join(root, "train"),
                        log=lambda msg: print(f"qformer: {msg}", file=log), on_step=on_step)
    trained = jax.device_get(summary["final_params"])
    tail = history[-max(1, len(history) // 10):]
    metrics = {k: float(np.mean([h[k] for h in tail])) for k in tail[-1]
               if k == "loss" or k.startswith("loss_") or k == "itm_accuracy"}
    with progress.phase("evaluate Q-Former"):
        metrics.update(retrieval(model, trained, paths["pairs_val"],
                                 load_tokenizer(paths["tokenizer"]), run.max_length))
    progress.line(f"Q-Former: held-out image-to-text R@1 {metrics['i2t_r1']:.3f}, "
                  f"text-to-image {metrics['t2i_r1']:.3f} (chance {metrics['chance']:.3f})")
    return (lambda llava_params: copy_qformer(trained, llava_params)), metrics


def retrieval(model, params, pairs_path, tokenizer, max_length: int) -> dict:
    """Held-out retrieval by the ITC similarity (`pretrain.blip2_retrieval.retrieval_r1`:
    the distinct captions are the candidates): its metrics plus `chance` (image-to-text,
    1 / candidates) and `candidates`."""
    from mllm_jax.pretrain.blip2_retrieval import retrieval_r1
    out = retrieval_r1(model, params, pairs_path, tokenizer, max_length=max_length)
    return {**out, "chance": out["i2t_chance"], "candidates": out["captions"]}


def report_text(settings, pretrain) -> str:
    """The report's account of the Q-Former run."""
    q = pretrain.get("qformer", {})
    s = settings
    retrieval = ""
    if "i2t_r1" in q:
        retrieval = (f" On the held-out split it retrieves the right caption among the "
                     f"{q['candidates']} distinct captions for {q['i2t_r1']:.1%} of the "
                     f"images (R@1; chance {q['chance']:.1%}) and the right image for "
                     f"{q['t2i_r1']:.1%} of the captions (chance {q['t2i_chance']:.1%}).")
    texts = {"phrases": "the world's objects, each image paired with each of its objects' "
                        "region phrases",
             "captions": "the world's image-caption pairs",
             "both": "the world's image-caption pairs and, as pairs of their own, each "
                     "object's region phrase"}[s.qformer_pretrain_texts]
    stage2 = {n: t for n, t, *_ in _stages()}["stage2"]
    llm = ("the Q-Former, its projection and the LLM" if recipe.LLM in stage2 else
           "the Q-Former and its projection (LLM frozen, as in InstructBLIP)")
    return f"""The ViT is pre-trained contrastively on image-caption and region-phrase
pairs, then frozen; the LLM is pre-trained on the world's text. Between them sits a Q-Former
({s.qformer_layers} layers of width {s.qformer_hidden}, each cross-attending to the ViT's
features): its {s.qformer_queries} query outputs, projected, are the image tokens the LLM
reads. Q-Former stage 1 (BLIP-2's representation learning) trains the queries and the
Q-Former with the image-text contrastive, matching and generation losses on {texts}
({s.qformer_pretrain.steps} steps of {s.qformer_pretrain.batch}).{retrieval}
Stage 1 (BLIP-2's generative pre-training) then trains the Q-Former and its projection on
captions, ViT and LLM frozen; stage 2 (instruction tuning) trains {llm} on the world's
instructions, the queries and Q-Former at learning rate {s.qformer_lr:g} in both. There is
no DPO stage in this run."""


def _stages():
    from mllm_jax.demo import configs
    return configs.QFORMER_STAGES
