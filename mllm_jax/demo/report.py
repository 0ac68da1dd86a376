"""The demo's report: report.md (settings, seed, the metrics table per stage, phase times),
metrics.json, and metrics.png (one panel per metric group, a line per metric over the
stages), drawn with PIL."""
from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw, ImageFont

from mllm_jax.demo import shapes

HEADLINE = ("vqa_mean", "vqa_existence", "vqa_count", "vqa_colour", "pope_random_f1",
            "pope_popular_f1", "pope_adversarial_f1", "chair_i", "chair_s", "cider")
LABELS = {"vqa_mean": "VQA accuracy, mean of kinds", "chair_i": "CHAIR_i (detailed captions)",
          "chair_s": "CHAIR_s (detailed captions)", "cider": "CIDEr-D (short captions)"}
LABELS.update({f"vqa_{k}": f"VQA accuracy: {k}" for k in shapes.VQA_KINDS})
for _m in shapes.POPE_MODES:
    LABELS.update({f"pope_{_m}_f1": f"POPE {_m}: F1", f"pope_{_m}_accuracy":
                   f"POPE {_m}: accuracy", f"pope_{_m}_yes_ratio": f"POPE {_m}: yes ratio"})
PANELS = (("VQA accuracy", ["vqa_mean"] + [f"vqa_{k}" for k in shapes.VQA_KINDS]),
          ("POPE F1", [f"pope_{m}_f1" for m in shapes.POPE_MODES]),
          ("CHAIR (lower is better)", ["chair_i", "chair_s"]),
          ("CIDEr-D", ["cider"]))
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127))


def metric_order(metrics: dict) -> list:
    seen = [k for k in LABELS if any(k in m for m in metrics.values())]
    rest = sorted({k for m in metrics.values() for k in m} - set(seen))
    return seen + rest


def table(metrics: dict) -> str:
    """Markdown: one row per metric, one column per stage."""
    stages = list(metrics)
    lines = ["| metric | " + " | ".join(stages) + " |",
             "|---|" + "---:|" * len(stages)]
    for k in metric_order(metrics):
        cells = [f"{metrics[s][k]:.3f}" if k in metrics[s] else "" for s in stages]
        lines.append(f"| {LABELS.get(k, k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(metrics: dict, total=None, pretrain=None) -> list:
    """The demo's acceptance targets as (what, measured, met) rows; with the Q-Former's
    stage-1 metrics in `pretrain` ("qformer"), its held-out retrieval against chance."""
    rows = []
    q = (pretrain or {}).get("qformer", {})
    if "i2t_r1" in q and "chance" in q:
        rows.append((f"Q-Former stage 1: held-out image-to-text R@1 >= 3 x chance "
                     f"({q['chance']:.3f})", f"{q['i2t_r1']:.3f}",
                     q["i2t_r1"] >= 3 * q["chance"]))
    s2, s3 = metrics.get("stage2", {}), metrics.get("stage3", {})
    for key, low in (("vqa_existence", 0.9), ("vqa_colour", 0.9), ("vqa_count", 0.7)):
        if key in s2:
            rows.append((f"stage 2 {LABELS[key]} >= {low}", f"{s2[key]:.3f}", s2[key] >= low))
    for mode in shapes.POPE_MODES:
        key = f"pope_{mode}_f1"
        if key in s2:
            rows.append((f"stage 2 {LABELS[key]} >= 0.85", f"{s2[key]:.3f}", s2[key] >= 0.85))
        if key in s2 and key in s3:
            rows.append((f"stage 3 {LABELS[key]} not lower than stage 2",
                         f"{s3[key]:.3f} vs {s2[key]:.3f}", s3[key] >= s2[key]))
    if "chair_i" in s2 and "chair_i" in s3:
        rows.append(("stage 3 CHAIR_i <= 0.7 x stage 2", f"{s3['chair_i']:.3f} vs "
                     f"{0.7 * s2['chair_i']:.3f}", s3["chair_i"] <= 0.7 * s2["chair_i"]))
    if total is not None:
        rows.append(("wall time <= 600 s", f"{total:.0f} s", total <= 600))
    return rows


def photo_lines(photos, workdir) -> str:
    """The final model's detailed description of each real photograph, or why there is
    none."""
    if not photos:
        return ("No photographs: install scikit-learn (or scikit-image), whose bundled "
                "sample images the demo describes (`pip install -e '.[demo]'`).")
    lines = ["The final model asked to describe real photographs, which its world never "
             "showed it:", ""]
    lines += [f"- `{os.path.relpath(path, workdir)}`: {text!r}" for name, path, text in photos]
    return "\n".join(lines)


def write(workdir, settings, metrics, times, pretrain, total=None, cpu_times=None,
          photos=None, connector="mlp") -> dict:
    """Writes report.md, metrics.json and metrics.png into workdir; returns their paths.
    `photos`: [(name, png path, description)] of `demo.photos.describe`; `connector`: the
    demo's ("mlp" or "qformer", whose run the report then describes)."""
    paths = {"report": os.path.join(workdir, "report.md"),
             "plot": os.path.join(workdir, "metrics.png"),
             "metrics": os.path.join(workdir, "metrics.json")}
    s = settings.to_dict()
    with open(paths["metrics"], "w") as f:
        json.dump({"seed": settings.seed, "connector": connector, "settings": s,
                   "metrics": metrics, "times": times, "cpu_times": cpu_times, "total": total,
                   "pretrain": pretrain}, f, indent=2)
    plot(metrics, paths["plot"])
    cpu = cpu_times or {}
    phases = "\n".join(f"| {name} | {sec:.1f} | {cpu.get(name, float('nan')):.1f} |"
                       for name, sec in times.items())
    if total is not None:
        phases += f"\n| total | {total:.1f} | {sum(cpu.values()):.1f} |"
    checks = "\n".join(f"| {what} | {value} | {'yes' if met else '**no**'} |"
                        for what, value, met in targets(metrics, total, pretrain))
    pre = "\n".join(f"- {name}: " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
        for name, m in pretrain.items())
    if connector == "qformer":
        from mllm_jax.demo import qformer
        title, recipe_text = " (Q-Former connector)", qformer.report_text(settings, pretrain)
    else:
        title, recipe_text = "", _llava_text(settings)
    text = f"""# mllm-jax demo: the shapes world{title}

Seed: **{settings.seed}**. Scenes rendered at {settings.image_size} px ({settings.train_scenes}
training scenes); evaluated on the held-out split "val" ({settings.eval_scenes} scenes) with
greedy decoding. {recipe_text}

## Metrics after each stage

{table(metrics)}

![metrics per stage]({os.path.basename(paths["plot"])})

## Targets

| target | measured | met |
|---|---|---|
{checks}

## Pre-training

{pre}

## Out-of-world photos

{photo_lines(photos, workdir)}

## Time per phase (seconds)

Wall time, and the CPU time of the process (all its threads) meanwhile.

| phase | wall | cpu |
|---|---:|---:|
{phases}

## Settings

```
{json.dumps(s, indent=1)}
```
"""
    with open(paths["report"], "w") as f:
        f.write(text)
    return paths


def _llava_text(settings) -> str:
    return f"""The ViT is pre-trained contrastively on image-caption and region-phrase
pairs, then frozen. Stage 1 trains the projector on captions; stage 2 the projector and the
LLM on instructions; stage 3 the projector and the LLM with DPO on preference pairs: detailed
captions (the faithful one chosen; rejected: the caption with an absent companion object
added, or the stage-2 model's own description where it named an absent object) and
existence questions (the true "yes" or "no" chosen). In {settings.hallucination_rate:.0%} of
the training scenes that miss an object's usual companion, the captions name it anyway: the
bias DPO is there to remove."""


def _font(size=12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def plot(metrics: dict, path: str, panel_size=(420, 300)):
    """A PNG with one line chart per panel of PANELS (x: stages, y: the metric)."""
    stages = list(metrics)
    panels = [(title, [k for k in keys if any(k in metrics[s] for s in stages)])
              for title, keys in PANELS]
    panels = [p for p in panels if p[1]]
    pw, ph = panel_size
    cols = 2
    rows = max(1, -(-len(panels) // cols))
    image = Image.new("RGB", (cols * pw, rows * ph), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(10)
    for n, (title, keys) in enumerate(panels):
        x0, y0 = (n % cols) * pw, (n // cols) * ph
        _panel(draw, (x0, y0, x0 + pw, y0 + ph), title, stages, keys, metrics, font, small)
    image.save(path)
    return path


def _panel(draw, box, title, stages, keys, metrics, font, small):
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 45, x1 - 135, y0 + 28, y1 - 40
    values = [metrics[s][k] for s in stages for k in keys if k in metrics[s]]
    lo, hi = min(0.0, min(values)), max(values)
    hi = 1.0 if hi <= 1.0 else hi * 1.1
    span = (hi - lo) or 1.0
    draw.text((x0 + 10, y0 + 6), title, fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for t in range(5):  # y ticks
        v = lo + span * t / 4
        y = bottom - (bottom - top) * t / 4
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.line([(left + 1, y), (right, y)], fill=(230, 230, 230))
        draw.text((x0 + 4, y - 6), f"{v:.2f}", fill="black", font=small)

    def xy(i, v):
        x = left + (right - left) * (i + 0.5) / len(stages)
        return x, bottom - (bottom - top) * (v - lo) / span

    for i, s in enumerate(stages):  # x ticks
        x, _ = xy(i, lo)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 18, bottom + 8), s, fill="black", font=small)
    draw.text(((left + right) / 2 - 15, bottom + 22), "stage", fill="black", font=small)
    for j, k in enumerate(keys):
        colour = COLOURS[j % len(COLOURS)]
        pts = [xy(i, metrics[s][k]) for i, s in enumerate(stages) if k in metrics[s]]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 14 * j  # legend
        draw.line([(right + 8, ly + 6), (right + 24, ly + 6)], fill=colour, width=2)
        draw.text((right + 28, ly), k.replace("vqa_", "").replace("pope_", "")
                  .replace("_f1", ""), fill="black", font=small)
