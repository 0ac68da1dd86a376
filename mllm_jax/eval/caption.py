"""Caption metrics: PTB-style tokenization, CIDEr-D and corpus BLEU-1..4.

Pure Python + numpy re-implementations mirroring the official COCO caption
evaluation toolkit (``pycocoevalcap``):

* :func:`ptb_tokenize` reimplements ``pycocoevalcap/tokenizer/ptbtokenizer.py``
  (Stanford CoreNLP ``PTBTokenizer -preserveLines -lowerCase`` followed by
  removal of the punctuation tokens in :data:`PTB_PUNCTUATIONS`) with regexes,
  without Java (see its docstring for what is and is not reproduced).
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
on whitespace only; call :func:`ptb_tokenize` first (``tokenize=True`` does it
for you) to reproduce the usual COCO pipeline.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Dict, Hashable, List, Mapping, Sequence, Tuple

import numpy as np

__all__ = [
    "PTB_PUNCTUATIONS",
    "ptb_tokenize",
    "ngram_counts",
    "cider_d",
    "bleu",
]

# Exactly the list removed by pycocoevalcap's PTBTokenizer after tokenization.
PTB_PUNCTUATIONS = frozenset([
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
    ".", "?", "!", ",", ":", "-", "--", "...", ";",
])

# Stanford PTB splits these clitics off the preceding word ("don't" -> "do n't",
# "man's" -> "man 's"); they are *not* in the punctuation list, so they survive.
_CLITIC_RE = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
# PTB splits these words in two ("cannot" -> "can not", "gonna" -> "gon na").
_SPLIT_WORDS_RE = re.compile(r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b|\b(gim|lem)(me)\b")
# Brackets become -LRB- -RRB- -LSB- -RSB- -LCB- -RCB-; -lowerCase lowercases them
# *after* that, so they no longer match the (upper-case) removal list and stay.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
             "}": "-rcb-"}
_BRACKET_RE = re.compile(r"[()\[\]{}]")
# Characters PTB makes tokens of: ellipsis, double dash, runs of ?/!, , ; : quotes,
# and the symbols & # $ % * (the symbols are kept, the rest removed).
_SPLIT_PUNCT_RE = re.compile(r"(\.\.\.|--|[?!]+|[,;:\"`&#$%*]|'')")
# Periods PTB leaves on a token: acronyms (u.s. a.m. e.g.), single-letter initials
# and common abbreviations; "no." only before a number ("no. 5").
_ACRONYM_RE = re.compile(r"^(?:[a-z]\.)+[a-z]?\.?$")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st ave mt jr sr inc co corp ltd vs etc rev prof gov gen sen rep capt col "
    "lt sgt fig jan feb mar apr jun jul aug sep sept oct nov dec".split())


def _final_period(tok: str, next_tok: str) -> str:
    core = tok.rstrip(".")
    if not core or tok.endswith(".."):
        return core
    keep = (_ACRONYM_RE.match(tok) is not None or core in _ABBREVIATIONS
            or (core == "no" and next_tok[:1].isdigit()))
    return tok if keep else core


def ptb_tokenize(text: str) -> str:
    """Lowercase + PTB-tokenize + drop punctuation tokens; return a space-joined string.

    Regex reimplementation of pycocoevalcap's ``PTBTokenizer`` (Stanford
    CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase``, then removal of
    :data:`PTB_PUNCTUATIONS`), checked against the real tokenizer's output:

    * lowercase; newlines are spaces; ``…`` is ``...``, em/en dashes ``--``;
    * clitics ``n't 's 're 've 'll 'd 'm`` split off and kept; ``cannot gonna
      wanna gotta gimme lemme`` split in two (``can not``, ``gon na``);
    * brackets become ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` and are *kept*
      (the removal list is upper case and ``-lowerCase`` applies after);
    * ``& # $ % *`` become tokens and are kept (``$ 5``, ``50 %``);
    * quotes, ``? ! , ; :``, ``...``, ``--`` and standalone ``-`` are
      removed; runs such as ``?!`` or ``!!`` are one token and are kept;
    * a sentence-final period is removed, but acronyms (``u.s.``, ``a.m.``),
      initials (``b.``) and common abbreviations (``mr.``, ``st.``, ``etc.``)
      keep theirs; periods inside tokens (``3.5``, ``dogs.three``) stay;
    * commas/colons between digits (``1,000``, ``10:30``) and intra-word
      hyphens / slashes (``hot-dog``, ``1/2``) stay attached.

    Not reproduced: emoticons, ``y'all``-style splits, a number glued to a unit
    (``12:30pm``), the abbreviation list's rarer entries.
    """
    s = text.replace("\n", " ").replace("\r", " ").replace("\u2026", "...")
    s = re.sub("[\u2013\u2014\u2015]", " -- ", s).lower()
    s = _CLITIC_RE.sub(r"\1 \2", s)
    s = _SPLIT_WORDS_RE.sub(lambda m: " ".join(g for g in m.groups() if g), s)
    s = _BRACKET_RE.sub(lambda m: " " + _BRACKETS[m.group(0)] + " ", s)
    # Protect digit-internal , and : (1,000 / 10:30) from splitting.
    s = re.sub(r"(?<=\d)([,:])(?=\d)", lambda m: {",": "\x00", ":": "\x01"}[m.group(1)], s)
    s = _SPLIT_PUNCT_RE.sub(r" \1 ", s)
    s = s.replace("\x00", ",").replace("\x01", ":")
    toks = s.split()
    out: List[str] = []
    for i, tok in enumerate(toks):
        if tok in _BRACKETS.values():
            out.append(tok)
            continue
        if tok in PTB_PUNCTUATIONS or tok == '"':  # PTB turns " into `` / '' (removed)
            continue
        # Leading quote/apostrophe that is not a clitic ('hello -> hello).
        if tok.startswith("'") and tok not in _CLITICS:
            tok = tok.lstrip("'")
        tok = tok.rstrip("'")  # plural possessive "dogs'" -> "dogs" + "'"
        # Leading/trailing dashes ("-hello", "word-") are split off by PTB.
        tok = tok.strip("-")
        if tok.endswith("."):
            tok = _final_period(tok, toks[i + 1] if i + 1 < len(toks) else "")
        if tok and tok not in PTB_PUNCTUATIONS:
            out.append(tok)
    return " ".join(out)


def ngram_counts(sentence: str, n: int = 4) -> Counter:
    """Counts of all 1..n-grams (tuples) of a whitespace-split sentence (``precook``)."""
    words = sentence.split()
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _prepare(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
             tokenize: bool):
    ids = list(candidates.keys())
    missing = [i for i in ids if i not in references]
    if missing:
        raise KeyError(f"no references for ids {missing[:5]}")
    cands, refs = {}, {}
    for i in ids:
        c = candidates[i]
        r = references[i]
        if isinstance(r, str):
            r = [r]
        if len(r) == 0:
            raise ValueError(f"id {i!r} has an empty reference list")
        cands[i] = ptb_tokenize(c) if tokenize else c
        refs[i] = [ptb_tokenize(x) if tokenize else x for x in r]
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
      tokenize: apply :func:`ptb_tokenize` to every string first.

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
