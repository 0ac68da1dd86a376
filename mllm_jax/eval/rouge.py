"""ROUGE-L for captions, mirroring ``pycocoevalcap/rouge/rouge.py`` (``Rouge``).

Per image: tokens split on single spaces (``" "``, as the toolkit does, so an empty
caption is one empty token), the longest common subsequence with each reference,
precision = LCS / candidate length and recall = LCS / reference length maximized
*separately* over the references, then ``F_beta`` with ``beta = 1.2``
(``(1 + b^2) P R / (R + b^2 P)``, 0 when either is 0). The corpus score is the mean
over images. Call :func:`mllm_jax.eval.caption.ptb_tokenize` first (``tokenize=True``)
for the COCO pipeline.
"""
from __future__ import annotations

from typing import Dict, Hashable, Mapping, Sequence, Tuple

import numpy as np

from mllm_jax.eval.caption import ptb_tokenize

BETA = 1.2


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_one(candidate: str, references: Sequence[str], beta: float = BETA) -> float:
    """ROUGE-L of one (tokenized) candidate against its (tokenized) references."""
    if not references:
        raise ValueError("ROUGE-L needs at least one reference")
    cand = candidate.split(" ")
    prec, rec = [], []
    for ref in references:
        toks = ref.split(" ")
        lcs = lcs_length(toks, cand)
        prec.append(lcs / float(len(cand)))
        rec.append(lcs / float(len(toks)))
    p, r = max(prec), max(rec)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p)


def rouge_l(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
            tokenize: bool = False) -> Tuple[float, Dict[Hashable, float]]:
    """(mean ROUGE-L, per-id ROUGE-L) over the ids of ``candidates``."""
    per_id = {}
    for i, cand in candidates.items():
        refs = references[i]
        if tokenize:
            cand, refs = ptb_tokenize(cand), [ptb_tokenize(r) for r in refs]
        per_id[i] = rouge_l_one(cand, refs)
    return float(np.mean(np.array(list(per_id.values())))), per_id
