"""Held-out image-text retrieval of a BLIP-2 stage-1 model (`model_type` blip2_qformer) by
its ITC similarity (the best query's cosine with the caption), as BLIP-2 ranks before its
ITM re-ranking.

Image-to-text R@1: for every held-out image, the best of the distinct held-out captions;
a hit when it is the image's own caption (a world that repeats captions has several images
per caption; a caption is a candidate once). Text-to-image R@1: for every distinct caption,
the best image; a hit when that image has the caption. Chance: the expected R@1 of a
uniform guess.

    python -m mllm_jax.pretrain.blip2_retrieval --checkpoint WORKDIR/final \\
        --pairs DATA/pairs_val.json --tokenizer DATA/tokenizer
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from mllm_jax.data import image as image_lib
from mllm_jax.data import pairs as pairs_lib
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.models import blip2_qformer  # noqa: F401  (registers the model family)
from mllm_jax.pretrain.contrastive import as_tokenizer, encode_chunked


def image_config(model_cfg):
    """The pipeline's preprocessing of the model's images (resize, centre crop, CLIP's mean
    and std): what training saw."""
    size = model_cfg.vision.image_size
    return image_lib.ImageProcessorConfig(mode="crop", size={"shortest_edge": size},
                                          crop_size=size)


def retrieval_metrics(image_vecs, caption_vecs, image_captions, captions) -> dict:
    """image_vecs [n, q, e], caption_vecs [m, e] (normalised); image_captions [n]: the index
    of each image's caption among the m distinct `captions`."""
    sim = np.einsum("iqe,te->itq", image_vecs, caption_vecs).max(-1)
    truth = np.asarray(image_captions)
    i2t = float(np.mean(np.argmax(sim, axis=1) == truth))
    t2i = float(np.mean(truth[np.argmax(sim, axis=0)] == np.arange(len(captions))))
    counts = np.bincount(truth, minlength=len(captions))
    return {"i2t_r1": i2t, "t2i_r1": t2i, "i2t_chance": 1.0 / len(captions),
            "t2i_chance": float(np.mean(counts / len(truth))), "images": len(truth),
            "captions": len(captions)}


def retrieval_r1(model, params, pairs, tokenizer, *, max_length: int = 32,
                 batch: int = 64) -> dict:
    """R@1 both ways and chance (`retrieval_metrics`) of a blip2_qformer `model` with
    `params` on (image, caption) `pairs` (a pairs / LLaVA caption JSON path or a list of
    (image path, caption))."""
    if isinstance(pairs, str):
        records = pairs_lib.read_caption_records(pairs)
        pairs = []
        for r in records:
            caption = pairs_lib.caption_of(r)
            if isinstance(caption, tuple) or len(r.images) != 1:
                raise ValueError(f"pair {r.id!r}: not one image with one caption")
            pairs.append((r.images[0], caption))
    if len(pairs) < 2:
        raise ValueError(f"retrieval needs at least 2 pairs, got {len(pairs)}")
    tok = as_tokenizer(tokenizer)
    cfg = image_config(model.cfg)
    pixels = np.stack([image_lib.preprocess(image_lib.read_image(p), cfg) for p, _ in pairs])
    captions = sorted({c for _, c in pairs})
    index = {c: k for k, c in enumerate(captions)}
    specials = pairs_lib.special_ids(tok)
    ids = np.full((len(captions), max_length), specials[2], np.int32)
    mask = np.zeros((len(captions), max_length), np.int32)
    for k, c in enumerate(captions):
        row = pairs_lib.caption_ids(c, tok, max_length, specials)
        ids[k, :len(row)], mask[k, :len(row)] = row, 1
    enc_img = jax.jit(lambda x: model.apply({"params": params}, x, method="encode_image"))
    enc_txt = jax.jit(lambda i, m: model.apply({"params": params}, i, m,
                                               method="encode_text"))
    img = encode_chunked(enc_img, (pixels.astype(np.float32),), batch)
    txt = encode_chunked(enc_txt, (ids, mask), batch)
    return retrieval_metrics(img, txt, [index[c] for _, c in pairs], captions)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a blip2_qformer orbax export "
                    "(a training workdir's final/)")
    ap.add_argument("--pairs", required=True, help="held-out pairs ({id, image, caption} "
                    "or LLaVA caption records)")
    ap.add_argument("--tokenizer", required=True, help="the Q-Former's tokenizer directory")
    ap.add_argument("--max_length", type=int, default=32)
    args = ap.parse_args(argv)
    from mllm_jax.convert.orbax_io import load_orbax
    model, params = load_orbax(args.checkpoint)
    if not hasattr(model, "encode_image"):
        raise ValueError(f"{args.checkpoint}: model_type {model.cfg.model_type!r} is not a "
                         "stage-1 Q-Former model (blip2_qformer)")
    out = retrieval_r1(model, params, args.pairs, load_tokenizer(args.tokenizer),
                       max_length=args.max_length)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
