"""BLIP-2's start for stage 1: the Q-Former of a `blip2_qformer` tree initialised from a BERT
checkpoint (HF `BertModel` / `BertForMaskedLM`, e.g. bert-base-uncased), as LAVIS's
`init_Qformer` does it.

BERT's word and position embeddings go to `embeddings/`, its embedding LayerNorm to the
Q-Former's input `layernorm`, each layer's self-attention to `attention/`, and its
feed-forward weights to both the text path (`intermediate` / `output`) and the query path
(`intermediate_query` / `output_query`: LAVIS copies them); the MLM head's transform and
bias to `cls/predictions/` (the decoder is tied to the word embeddings). The vocabulary
grows by the decoder token: rows past BERT's keep their initial values, as
`resize_token_embeddings` leaves them. Cross-attention, query tokens, projections, the ITM
head and the temperature keep their initial values; BERT's token-type embeddings and pooler
are not used (LAVIS's BERT embeddings have no token types).
"""
from __future__ import annotations

import os
import re

import flax
import numpy as np

_LAYER = r"(?:bert\.)?encoder\.layer\.(\d+)\."
# BERT key (after the layer prefix) -> our path(s) under qformer/encoder/layer_{i}/.
_LAYER_MAP = {
    "attention.self.query": ["attention/attention/query"],
    "attention.self.key": ["attention/attention/key"],
    "attention.self.value": ["attention/attention/value"],
    "attention.output.dense": ["attention/output/dense"],
    "attention.output.LayerNorm": ["attention/output/LayerNorm"],
    "intermediate.dense": ["intermediate/dense", "intermediate_query/dense"],
    "output.dense": ["output/dense", "output_query/dense"],
    "output.LayerNorm": ["output/LayerNorm", "output_query/LayerNorm"],
}
_TOP_MAP = {
    "embeddings.word_embeddings.weight": "embeddings/word_embeddings/embedding",
    "embeddings.position_embeddings.weight": "embeddings/position_embeddings/embedding",
    "embeddings.LayerNorm.weight": "qformer/layernorm/scale",
    "embeddings.LayerNorm.bias": "qformer/layernorm/bias",
    "cls.predictions.transform.dense.weight": "cls/predictions/transform/dense/kernel",
    "cls.predictions.transform.dense.bias": "cls/predictions/transform/dense/bias",
    "cls.predictions.transform.LayerNorm.weight": "cls/predictions/transform/LayerNorm/scale",
    "cls.predictions.transform.LayerNorm.bias": "cls/predictions/transform/LayerNorm/bias",
    "cls.predictions.bias": "cls/predictions/bias",
}
_UNUSED = re.compile(r"(token_type_embeddings|pooler\.|position_ids|cls\.predictions\.decoder"
                     r"|cls\.seq_relationship)")


def _leaf(name: str, suffix: str):
    """(our leaf name, transpose?) of a BERT tensor suffix."""
    if name.endswith("LayerNorm"):
        return {"weight": ("scale", False), "bias": ("bias", False),
                "gamma": ("scale", False), "beta": ("bias", False)}[suffix]
    return {"weight": ("kernel", True), "bias": ("bias", False)}[suffix]


def bert_targets(key: str) -> list:
    """[(our '/'-joined path, transpose?)] of a BERT checkpoint key ([] when not used)."""
    m = re.match(_LAYER + r"(.+)\.(weight|bias|gamma|beta)$", key)
    if m:
        i, name, suffix = int(m.group(1)), m.group(2), m.group(3)
        if name not in _LAYER_MAP:
            return []
        leaf, transpose = _leaf(name, suffix)
        return [(f"qformer/encoder/layer_{i}/{p}/{leaf}", transpose)
                for p in _LAYER_MAP[name]]
    plain = key[len("bert."):] if key.startswith("bert.") else key
    if plain in _TOP_MAP:
        return [(_TOP_MAP[plain], plain.endswith("dense.weight"))]
    return []


def from_bert(params, bert, *, strict: bool = True):
    """`params` (a blip2_qformer tree) with the BERT weights in place. `bert`: an HF BERT
    directory (safetensors) or a {key: array} dict. With `strict`, a BERT tensor that is
    neither mapped nor known to be unused is an error (a different architecture)."""
    if isinstance(bert, (str, os.PathLike)):
        from mllm_jax.convert.safetensors_io import CheckpointReader
        reader = CheckpointReader(os.fspath(bert))
        bert = {k: reader.get(k) for k in reader.keys()}
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out, unknown, done = dict(flat), [], set()
    for key, value in bert.items():
        targets = bert_targets(key)
        if not targets:
            if not _UNUSED.search(key):
                unknown.append(key)
            continue
        value = np.asarray(value, np.float32)
        for path, transpose in targets:
            if path not in flat:
                raise ValueError(f"BERT tensor {key} maps to {path}, which the blip2_qformer "
                                 "tree does not have: the Q-Former has fewer layers than "
                                 "the BERT checkpoint (num_hidden_layers)")
            v = value.T if transpose else value
            have = np.shape(flat[path])
            if path.startswith("embeddings/word") or path == "cls/predictions/bias":
                if v.shape[0] > have[0] or v.shape[1:] != have[1:]:
                    raise ValueError(f"{key} {v.shape} does not fit {path} {have}")
                base = np.array(flat[path], np.float32)
                base[:v.shape[0]] = v  # the added tokens ([DEC]) keep their initial rows
                v = base
            elif v.shape != have:
                raise ValueError(f"BERT tensor {key} has shape {v.shape}, {path} has {have}: "
                                 "give the Q-Former BERT's sizes (hidden_size, "
                                 "intermediate_size, max_position_embeddings)")
            out[path] = v.astype(np.asarray(flat[path]).dtype)
            done.add(path)
    if strict and unknown:
        raise ValueError(f"{len(unknown)} BERT tensors are not mapped, e.g. {unknown[:3]}: "
                         "not a BERT checkpoint, or pass strict=False")
    missing = sorted({p.rsplit("/", 2)[0] for p in flat if p.startswith("qformer/encoder/")
                      and "crossattention" not in p and p not in done})
    if strict and missing:
        raise ValueError(f"the BERT checkpoint has no weights for {missing[:3]}: it has fewer "
                         "layers than the Q-Former (num_hidden_layers)")
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
