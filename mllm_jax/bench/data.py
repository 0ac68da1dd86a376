"""`mllm-jax bench data`: samples/s of the LLaVA JSON pipeline on this machine, and how full
its rows are with and without sample packing (`data.packing`).

The data are made on the spot: photographs-sized JPEGs (smooth gradients with noise),
conversations whose lengths follow a LLaVA-1.5-like mix (`MIX`), a sentencepiece tokenizer
trained on their text (or `--tokenizer DIR`), CLIP preprocessing at 336 px with LLaVA-1.5's
pad-to-square (576 image tokens), the vicuna_v1 template, rows of 2048 tokens. Prints one
JSON line: samples/s, the padding fraction, real tokens and samples per row, unpacked and
packed ("packed"), the mean tokens of each kind of sample, and the bench preset's
consumption rate from `--step-time` (seconds per step of `bench train`).
"""
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

WORDS = ("a red cube sits on the left of a blue sphere near the green triangle while two "
         "small yellow stars float above the large purple cylinder in the corner").split()


def _make_images(root, n, rng, first=0):
    names = []
    for i in range(first, first + n):
        w, h = int(rng.integers(400, 800)), int(rng.integers(300, 600))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        name = f"img{i:05d}.jpg"
        Image.fromarray(img).save(os.path.join(root, name), quality=90)
        names.append(name)
    return names


# LLaVA-1.5's 665k instruction mix by kind of sample (its published composition): 70% short
# VQA-style conversations about one image (VQAv2, GQA, OCR-VQA, A-OKVQA, TextCaps, RefCOCO, VG:
# several questions with their answer-format instruction, answers of a few words), 24%
# LLaVA-Instruct conversations, descriptions and reasoning about one image (long answers),
# 6% ShareGPT text-only chats (the longest, some past 2048 tokens).
# kind -> (weight, has an image, turns, question words, answer words), ranges inclusive. The
# tokenizer made here gives about one token per word (LLaMA's: about 1.3 per English word).
MIX = {
    "vqa": (0.70, True, (1, 8), (6, 16), (1, 3)),
    "instruct": (0.24, True, (1, 5), (6, 20), (20, 150)),
    "text": (0.06, False, (1, 6), (5, 60), (60, 400)),
}


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def _between(rng, low_high):
    return int(rng.integers(low_high[0], low_high[1] + 1))


def _conversation(rng, kind):
    """A conversation of `kind` (see MIX): its turns' lengths drawn from the kind's ranges."""
    _, has_image, turns, question, answer = MIX[kind]
    conv = []
    for t in range(_between(rng, turns)):
        q = _sentence(rng, _between(rng, question)) + "?"
        conv += [{"from": "human", "value": ("<image>\n" + q) if has_image and t == 0 else q},
                 {"from": "gpt", "value": _sentence(rng, _between(rng, answer))}]
    return conv


def _make_entries(root, samples, rng):
    """`samples` LLaVA JSON entries of kinds drawn with MIX's weights (ids "{kind}-{i}")."""
    kinds = list(MIX)
    weights = np.array([MIX[k][0] for k in kinds])
    entries = []
    for i, k in enumerate(rng.choice(len(kinds), samples, p=weights / weights.sum())):
        kind = kinds[k]
        entry = {"id": f"{kind}-{i}", "conversations": _conversation(rng, kind)}
        if MIX[kind][1]:
            entry["image"] = _make_images(root, 1, rng, first=i)[0]
        entries.append(entry)
    return entries


def _make_tokenizer(directory, texts):
    import sentencepiece as spm
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)  # LLaMA's settings
    size = spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "added_tokens_decoder": {
                       str(size): {"content": "<image>", "special": True},
                       str(size + 1): {"content": "<pad>", "special": True}}}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"image_token_index": size, "pad_token_id": size + 1}, f)
    return directory


def make_mix(directory, samples, rng, tokenizer=None):
    """A LLaVA JSON file of `samples` conversations drawn from MIX, with their images, in
    `directory`, and a tokenizer trained on their text (or `tokenizer`, a checkpoint
    directory). Returns (json path, tokenizer directory)."""
    from mllm_jax.data.templates import get_template
    entries = _make_entries(directory, samples, rng)
    path = os.path.join(directory, "data.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    # The template's system prompt is in the tokenizer's text, so it takes a realistic
    # number of tokens (about 30) rather than bytes.
    texts = [c["value"] for e in entries for c in e["conversations"]]
    return path, tokenizer or _make_tokenizer(
        os.path.join(directory, "tok"), texts + [get_template("vicuna_v1").default_system] * 8)


def mix_pipeline(path, tokenizer, *, image_size, image_tokens, batch, max_length, packing,
                 workers=2, seed=0, packing_images=0):
    """The LlavaPipeline of `make_mix`'s data: CLIP preprocessing with LLaVA-1.5's
    pad-to-square at `image_size`, vicuna_v1, one image per sample at most."""
    from mllm_jax.data.image import CLIP_MEAN, CLIP_STD, ImageProcessorConfig
    from mllm_jax.data.llava_json import read_llava_json
    from mllm_jax.data.pipeline import LlavaPipeline
    cfg = ImageProcessorConfig(mode="pad", size={"shortest_edge": image_size},
                               crop_size=image_size, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return LlavaPipeline(read_llava_json(path), tokenizer, cfg, "vicuna_v1",
                         global_batch_size=batch, max_length=max_length, max_images=1,
                         image_tokens_per_image=image_tokens, seed=seed, num_workers=workers,
                         return_sample_ids=True, packing=packing,
                         packing_images=packing_images)


def run(samples=64, batch=16, workers=2, image_size=336, max_length=2048, tokenizer=None,
        step_time=None, train_batch=4, seed=0) -> dict:
    """The figures of the module docstring; `samples` conversations, timed over
    `samples // batch - 1` batches of `batch` rows after one warm-up batch, unpacked and then
    packed."""
    from mllm_jax.data.tokenizer import load_tokenizer
    from mllm_jax.models import registry
    from mllm_jax import presets
    rng = np.random.default_rng(seed)
    n_batches = max(1, samples // batch - 1)
    model_cfg = presets.get("llava-1.5-7b")  # a CLIP ViT-L/14 tower at image_size
    model_cfg.vision.image_size = image_size
    with tempfile.TemporaryDirectory() as tmp:
        path, tok_dir = make_mix(tmp, samples, rng, tokenizer)
        tok = load_tokenizer(tok_dir)

        def timed(packing):
            pipe = mix_pipeline(path, tok, image_size=image_size,
                                image_tokens=registry.tokens_per_image(model_cfg),
                                batch=batch, max_length=max_length, packing=packing,
                                workers=workers, seed=seed)
            next(pipe)  # warm up the pool and the tokenizer's caches
            t = time.perf_counter()
            batches = [next(pipe) for _ in range(n_batches)]
            dt = time.perf_counter() - t
            pipe.close()
            return batches, dt

        plain, dt = timed(False)
        packed, dt_packed = timed(True)
    rate = n_batches * batch / dt
    out = {"samples_per_s": round(rate, 2), "batch": batch, "workers": workers,
           "image_size": image_size, "max_length": max_length, "template": "vicuna_v1",
           "samples_timed": n_batches * batch, **fill(plain)}
    packed_fill = fill(packed)
    n_packed = round(packed_fill["samples_per_row"] * batch * n_batches)
    out["packed"] = {"samples_per_s": round(n_packed / dt_packed, 2),
                     "samples_timed": n_packed, **packed_fill}
    out["packing_tokens_per_row_gain"] = round(
        packed_fill["tokens_per_row"] / out["tokens_per_row"], 3)
    out["mean_tokens_by_kind"] = _tokens_by_kind(plain)
    if step_time:
        need = train_batch / step_time
        out.update(train_samples_per_s=round(need, 3), headroom=round(rate / need, 1))
        need_packed = need * packed_fill["samples_per_row"]
        out["packed"].update(train_samples_per_s=round(need_packed, 3),
                             headroom=round(out["packed"]["samples_per_s"] / need_packed, 1))
    return out


def fill(batches) -> dict:
    """Padding fraction, real tokens and samples per row over the batches."""
    from mllm_jax.data.packing import fill_stats
    stats = [fill_stats(b) for b in batches]
    rows = sum(s["rows"] for s in stats)
    real = sum(s["real_tokens"] for s in stats)
    size = rows * batches[0]["attention_mask"].shape[1]
    return {"padding_fraction": round(1 - real / size, 4),
            "tokens_per_row": round(real / rows, 1),
            "samples_per_row": round(sum(s["samples_per_row"] * s["rows"] for s in stats)
                                     / rows, 3)}


def _tokens_by_kind(batches) -> dict:
    """Mean tokens (after truncation to max_length) of each kind of sample, one per row."""
    lengths = {}
    for b in batches:
        for sid, n in zip(b["sample_ids"], b["attention_mask"].sum(1)):
            lengths.setdefault(str(sid).split("-")[0], []).append(int(n))
    return {k: round(float(np.mean(v)), 1) for k, v in sorted(lengths.items())}
