"""`mllm-jax bench data`: samples/s of the LLaVA JSON pipeline on this machine.

The data are made on the spot: photographs-sized JPEGs (smooth gradients with noise),
LLaVA-style two-turn conversations, a sentencepiece tokenizer trained on their text (or
`--tokenizer DIR`), CLIP preprocessing at 336 px with LLaVA-1.5's pad-to-square, the
vicuna_v1 template, sequences of 2048 tokens. Prints one JSON line with samples/s and the
bench preset's consumption rate from `--step-time` (seconds per step of `bench train`).
"""
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

WORDS = ("a red cube sits on the left of a blue sphere near the green triangle while two "
         "small yellow stars float above the large purple cylinder in the corner").split()


def _make_images(root, n, rng):
    names = []
    for i in range(n):
        w, h = int(rng.integers(400, 800)), int(rng.integers(300, 600))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        name = f"img{i:05d}.jpg"
        Image.fromarray(img).save(os.path.join(root, name), quality=90)
        names.append(name)
    return names


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def _make_tokenizer(directory, texts):
    import sentencepiece as spm
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=300, model_type="bpe",
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


def run(samples=64, batch=16, workers=2, image_size=336, max_length=2048, tokenizer=None,
        step_time=None, train_batch=4, seed=0) -> dict:
    from mllm_jax.data.image import CLIP_MEAN, CLIP_STD, ImageProcessorConfig
    from mllm_jax.data.llava_json import read_llava_json
    from mllm_jax.data.pipeline import LlavaPipeline
    from mllm_jax.data.tokenizer import load_tokenizer
    from mllm_jax.models import registry
    from mllm_jax import presets
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        names = _make_images(tmp, samples, rng)
        entries = []
        for i, name in enumerate(names):
            entries.append({"id": f"s{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\n" + _sentence(rng, 12) + "?"},
                {"from": "gpt", "value": _sentence(rng, 40)},
                {"from": "human", "value": _sentence(rng, 8) + "?"},
                {"from": "gpt", "value": _sentence(rng, 30)}]})
        path = os.path.join(tmp, "data.json")
        with open(path, "w") as f:
            json.dump(entries, f)
        tok_dir = tokenizer or _make_tokenizer(
            os.path.join(tmp, "tok"), [c["value"] for e in entries for c in e["conversations"]])
        cfg = ImageProcessorConfig(mode="pad", size={"shortest_edge": image_size},
                                   crop_size=image_size, image_mean=CLIP_MEAN,
                                   image_std=CLIP_STD)
        model_cfg = presets.get("llava-1.5-7b")  # a CLIP ViT-L/14 tower at image_size
        model_cfg.vision.image_size = image_size
        tokens_per_image = registry.tokens_per_image(model_cfg)
        pipe = LlavaPipeline(read_llava_json(path), load_tokenizer(tok_dir), cfg, "vicuna_v1",
                             global_batch_size=batch, max_length=max_length, max_images=1,
                             image_tokens_per_image=tokens_per_image, seed=seed,
                             num_workers=workers)
        next(pipe)  # warm up the pool and the tokenizer's caches
        n_batches = max(1, samples // batch - 1)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(pipe)
        dt = time.perf_counter() - t
        pipe.close()
    rate = n_batches * batch / dt
    out = {"samples_per_s": round(rate, 2), "batch": batch, "workers": workers,
           "image_size": image_size, "max_length": max_length, "template": "vicuna_v1",
           "samples_timed": n_batches * batch}
    if step_time:
        need = train_batch / step_time
        out.update(train_samples_per_s=round(need, 3), headroom=round(rate / need, 1))
    return out
