"""Caption metrics: PTB-style tokenization, CIDEr-D and corpus BLEU-1..4.

Pure Python + numpy re-implementations mirroring the official COCO caption
evaluation toolkit (``pycocoevalcap``):

* :func:`ptb_tokenize` (from :mod:`mllm_jax.eval.ptb`) is
  ``pycocoevalcap/tokenizer/ptbtokenizer.py`` without Java: Stanford CoreNLP
  3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` followed by removal of the
  punctuation tokens in :data:`PTB_PUNCTUATIONS`.
* :func:`cider_d` mirrors ``pycocoevalcap/cider/cider_scorer.py`` (checked
  line by line against salaniz/pycocoevalcap) (which,
  despite its name, implements CIDEr-D): n = 1..4, sigma = 6, tf-idf weights with
  document frequencies computed from the references of the *evaluated* set,
  clipped numerator ``min(vec_hyp, vec_ref) * vec_ref``, Gaussian length
  penalty, x10, mean over references and n-gram orders.
* :func:`bleu` mirrors ``pycocoevalcap/bleu/bleu_scorer.py`` as called by
  ``Bleu.compute_score`` (``option="closest"``): corpus-level modified
  precisions with max-ref clipping, "closest" reference length per sentence
  (ties broken towards the shorter reference), tiny/small smoothing constants
  and the brevity penalty ``exp(1 - r/c)`` when ``c < r``.

Like the official scorers, :func:`cider_d` and :func:`bleu` split their inputs
on whitespace only; ``tokenize=True`` tokenizes them first as pycocoevalcap's
``COCOEvalCap`` does (references and candidates each as one text, in id order),
which reproduces the usual COCO pipeline.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from typing import Dict, Hashable, Mapping, Sequence, Tuple

import numpy as np

from mllm_jax.eval.ptb import PTB_PUNCTUATIONS, ptb_tokenize, ptb_tokenize_lines

__all__ = [
    "PTB_PUNCTUATIONS",
    "ptb_tokenize",
    "ptb_tokenize_lines",
    "ngram_counts",
    "cider_d",
    "bleu",
]


def ngram_counts(sentence: str, n: int = 4) -> Counter:
    """Counts of all 1..n-grams (tuples) of a whitespace-split sentence (``precook``)."""
    words = sentence.split()
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


@functools.lru_cache(maxsize=4)
def _tokenized(captions: Tuple[str, ...]) -> Tuple[str, ...]:
    # bleu() and cider_d() are usually called one after the other on the same captions.
    return tuple(ptb_tokenize_lines(captions))


def _prepare(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
             tokenize: bool):
    ids = list(candidates.keys())
    missing = [i for i in ids if i not in references]
    if missing:
        raise KeyError(f"no references for ids {missing[:5]}")
    refs = {}
    for i in ids:
        r = references[i]
        refs[i] = [r] if isinstance(r, str) else list(r)
        if not refs[i]:
            raise ValueError(f"id {i!r} has an empty reference list")
    cands = {i: candidates[i] for i in ids}
    if tokenize:
        # As COCOEvalCap: the references, then the candidates, each tokenized as one text
        # (one caption per line, in id order), so a caption's last token sees the next line.
        flat = iter(_tokenized(tuple(x for i in ids for x in refs[i])))
        refs = {i: [next(flat) for _ in refs[i]] for i in ids}
        cands = dict(zip(ids, _tokenized(tuple(cands[i] for i in ids))))
    return ids, cands, refs


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
            n: int = 4, sigma: float = 6.0, tokenize: bool = False
            ) -> Tuple[float, Dict[Hashable, float]]:
    """CIDEr-D, mirroring ``pycocoevalcap.cider.cider_scorer.CiderScorer``.

    Args:
      candidates: id -> one candidate caption (whitespace tokenized unless
        ``tokenize=True``).
      references: id -> list of reference captions.
      n: maximum n-gram order (4 in COCO).
      sigma: std-dev of the Gaussian length penalty (6 in COCO).
      tokenize: PTB-tokenize the references, then the candidates, each as one text in
        id order (:func:`ptb_tokenize_lines`), as pycocoevalcap's ``COCOEvalCap`` does.

    Returns:
      ``(corpus_score, {id: score})`` where the corpus score is the mean of the
      per-id scores.

    Details reproduced from the official scorer:

    * document frequency ``df(g)`` = number of *images* (ids) whose reference
      set contains n-gram ``g``; ``log_N = log(#ids)``; weight
      ``tf(g) * (log_N - log(max(1, df(g))))`` (so with a single image every
      weight is 0 and the score is 0, as in the official code);
    * the "length" used by the length penalty is the number of *bigrams*
      (``len(words) - 1``, 0 for empty) -- a quirk of the official code that
      cancels in the difference except when a sentence is empty;
    * per n: ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` (0 if either norm is 0)
      times ``exp(-(len_h - len_r)^2 / (2 sigma^2))``; averaged over n, averaged
      over references, times 10.
    """
    ids, cands, refs = _prepare(candidates, references, tokenize)
    if not ids:
        return 0.0, {}
    crefs = {i: [ngram_counts(r, n) for r in refs[i]] for i in ids}
    ctest = {i: ngram_counts(cands[i], n) for i in ids}

    df: Dict[tuple, float] = defaultdict(float)
    for i in ids:
        for g in set(g for rc in crefs[i] for g in rc):
            df[g] += 1.0
    log_n = math.log(float(len(ids)))

    def to_vec(cnts: Counter):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in cnts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df.get(g, 0.0))))
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    per_id: Dict[Hashable, float] = {}
    for i in ids:
        vh, nh, lh = to_vec(ctest[i])
        total = np.zeros(n)
        for rc in crefs[i]:
            vr, nr, lr = to_vec(rc)
            delta = float(lh - lr)
            pen = math.exp(-(delta ** 2) / (2.0 * sigma ** 2))
            val = np.zeros(n)
            for k in range(n):
                for g, wh in vh[k].items():
                    wr = vr[k].get(g, 0.0)
                    val[k] += min(wh, wr) * wr
                if nh[k] != 0 and nr[k] != 0:
                    val[k] /= nh[k] * nr[k]
                val[k] *= pen
            total += val
        per_id[i] = float(np.mean(total) / len(crefs[i]) * 10.0)
    corpus = float(np.mean([per_id[i] for i in ids]))
    return corpus, per_id


def bleu(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
         n: int = 4, tokenize: bool = False) -> Tuple[float, ...]:
    """Corpus BLEU-1..n, mirroring ``pycocoevalcap.bleu.bleu_scorer.BleuScorer``
    with ``option="closest"`` (what ``Bleu(4).compute_score`` uses).

    Returns a tuple ``(bleu_1, ..., bleu_n)``; ``bleu_k`` is the geometric mean of
    the corpus-level modified precisions p_1..p_k times the corpus brevity
    penalty.  As in the official code, ``p_k = (correct_k + 1e-15) / (guess_k + 1e-9)``
    and the brevity penalty is ``exp(1 - 1/ratio)`` with
    ``ratio = (c + 1e-15) / (r + 1e-9)`` when ``ratio < 1``, where ``c`` is the
    total candidate length and ``r`` the sum of per-sentence closest reference
    lengths (ties -> shorter reference).
    """
    ids, cands, refs = _prepare(candidates, references, tokenize)
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    c_total = 0
    r_total = 0
    for i in ids:
        words = cands[i].split()
        testlen = len(words)
        counts = ngram_counts(cands[i], n)
        maxref: Dict[tuple, int] = {}
        reflens = []
        for r in refs[i]:
            reflens.append(len(r.split()))
            for g, c in ngram_counts(r, n).items():
                maxref[g] = max(maxref.get(g, 0), c)
        r_total += min((abs(l - testlen), l) for l in reflens)[1]
        c_total += testlen
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for g, c in counts.items():
            correct[len(g) - 1] += min(maxref.get(g, 0), c)
    scores = []
    prod = 1.0
    for k in range(n):
        prod *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (c_total + tiny) / (r_total + small)
    if ratio < 1:
        bp = math.exp(1 - 1 / ratio)
        scores = [s * bp for s in scores]
    return tuple(scores)
