"""`mllm-jax bench train --packing`: real (non-padding) tokens per second of a preset's
training step on batches of `bench data`'s LLaVA-like mix, with and without `data.packing`.

Both runs use the same rows (batch x seq_len tokens, seq_len = the image's tokens +
--text-len, as `bench train`) and one trainer, their steps alternating (a machine shared with
other work slows both alike); the batches come from the real pipeline
(`bench.data.mix_pipeline`, images at the preset's resolution, a tokenizer trained on the
spot). Padding costs as much compute as real tokens, so packing's gain is the real
tokens per step it adds, less what its batches cost more: a packed row also carries more
images (`row_images`), which the vision tower encodes whether a sample uses them or not.
Prints one JSON line: per run the median step time, real tokens and samples per step, the
padding fraction and real tokens/s, and the gain in real tokens/s.
"""
import tempfile
import time

import jax
import numpy as np

from mllm_jax.bench import data as bench_data
from mllm_jax.bench.train import bench_config
from mllm_jax.data.packing import fill_stats
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.models import registry
from mllm_jax.train.loop import build_trainer


def _batches(cfg, path, tok, seq_len, batch, n, packing, seed):
    """n batches of the mix at the model's resolution, packed or not, and the images a row
    holds."""
    pipe = bench_data.mix_pipeline(
        path, tok, image_size=cfg.model.vision.image_size,
        image_tokens=registry.tokens_per_image(cfg.model), batch=batch, max_length=seq_len,
        packing=packing, seed=seed)
    batches = [next(pipe) for _ in range(n)]
    pipe.close()
    for b in batches:
        b.pop("sample_ids")
    return batches, pipe.row_images


def _time_steps(trainer, runs, warmup):
    """Median seconds per step of each run (a list of batches of one shape), compiled for
    its shapes. The runs' steps alternate, so a machine shared with other work slows them
    alike."""
    compiled, arrays = [], []
    for batches in runs:
        arrays.append([trainer.global_batch(b) for b in batches])
        compiled.append(trainer.jit_step(batches[0]).lower(
            trainer.state, trainer.frozen, trainer.frozen_extra, arrays[-1][0]).compile())
    state, times = trainer.state, [[] for _ in runs]
    for i in range(len(runs[0])):
        for k, step in enumerate(compiled):
            t = time.perf_counter()
            state, metrics = step(state, trainer.frozen, trainer.frozen_extra, arrays[k][i])
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    trainer.state = state
    return [float(np.median(t)) for t in times]


def run(preset="llava-bench-small", stage=2, batch=4, text_len=768, steps=5, warmup=2,
        dtype="float32", samples=96, seed=0) -> dict:
    """The figures of the module docstring, for rows of tokens_per_image + text_len tokens
    and a mix of `samples` conversations (the model's image token set to the tokenizer's)."""
    cfg = bench_config(preset, stage, batch, text_len, dtype)
    if not registry.is_multimodal(cfg.model):
        raise ValueError(f"bench train --packing packs image-text samples; preset {preset!r} "
                         "takes no images")
    seq_len = registry.tokens_per_image(cfg.model) + text_len
    with tempfile.TemporaryDirectory() as tmp:
        path, tok_dir = bench_data.make_mix(tmp, samples, np.random.default_rng(seed))
        tok = load_tokenizer(tok_dir)
        cfg.model.image_token_index = tok.image_token_id
        # A preset with a smaller vocabulary than the tokenizer's (tiny-llava) grows to it.
        cfg.model.text.vocab_size = max(cfg.model.text.vocab_size, tok.vocab_size)
        made = [_batches(cfg, path, tok, seq_len, batch, warmup + steps, packing, seed)
                for packing in (False, True)]
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    step_s = _time_steps(trainer, [batches for batches, _ in made], warmup)
    runs = {name: _figures(batches[warmup:], s, row_images)
            for name, (batches, row_images), s in zip(("unpacked", "packed"), made, step_s)}
    gain = runs["packed"]["real_tokens_per_s"] / runs["unpacked"]["real_tokens_per_s"]
    return {"preset": preset, "stage": stage, "batch": batch, "seq_len": seq_len,
            "dtype": dtype, **runs, "real_tokens_per_s_gain": round(gain, 3)}


def _figures(batches, step_s, row_images) -> dict:
    """Step time, real tokens and samples per step, padding, real tokens/s."""
    fills = [fill_stats(b) for b in batches]
    rows = fills[0]["rows"]
    real = float(np.mean([f["real_tokens"] for f in fills]))
    return {"step_time_s": round(step_s, 4), "images_per_row": row_images,
            "real_tokens_per_step": round(real, 1),
            "samples_per_step": round(float(np.mean([f["samples_per_row"] for f in fills]))
                                      * rows, 2),
            "padding_fraction": round(float(np.mean([f["padding_fraction"] for f in fills])),
                                      4),
            "real_tokens_per_s": round(real / step_s, 1)}
