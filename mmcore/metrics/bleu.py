"""Corpus BLEU-4 exactly as the COCO caption evaluation computes it (pycocoevalcap's BleuScorer,
"closest" reference length), plus per-sample sufficient statistics for bootstrapping."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from mmcore.metrics.ptb_tokenize import ptb_tokenize

N = 4
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's smoothing constants


def _ngrams(words: list[str], n: int = N) -> Counter:
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(candidates: dict, references: dict) -> None:
    if set(candidates) != set(references):
        missing = sorted(set(references) ^ set(candidates), key=str)[:5]
        raise ValueError(f"candidates and references must have the same ids; differing ids: {missing}")
    empty = [k for k, v in references.items() if not v]
    if empty:
        raise ValueError(f"ids {empty[:5]} have no reference captions")


def sample_stats(candidate: str, references: list[str]) -> np.ndarray:
    """`[testlen, reflen, guess_1..4, correct_1..4]` of one candidate (already tokenised, space-joined)."""
    words = candidate.split()
    ref_words = [r.split() for r in references]
    reflen = min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    max_ref = Counter()
    for r in ref_words:
        for gram, c in _ngrams(r).items():
            max_ref[gram] = max(max_ref[gram], c)
    correct = [0] * N
    for gram, c in _ngrams(words).items():
        correct[len(gram) - 1] += min(c, max_ref[gram])
    guess = [max(0, len(words) - k + 1) for k in range(1, N + 1)]
    return np.array([len(words), reflen, *guess, *correct], dtype=np.float64)


def bleu4_stats(candidates: dict, references: dict) -> dict:
    """`{id: stats (10,)}`; `bleu4_from_stats` of any multiset of them is that corpus's BLEU-4."""
    _check(candidates, references)
    return {
        k: sample_stats(" ".join(ptb_tokenize(candidates[k])), [" ".join(ptb_tokenize(r)) for r in references[k]])
        for k in candidates
    }


def bleu4_from_stats(stats) -> float:
    """Corpus BLEU-4 from per-sample stats (an iterable of `(10,)` arrays or an `(n, 10)` array)."""
    total = np.sum(np.asarray(list(stats) if not isinstance(stats, np.ndarray) else stats), axis=0)
    testlen, reflen, guess, correct = total[0], total[1], total[2:6], total[6:10]
    bleu = 1.0
    for k in range(N):
        bleu *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
    bleu = bleu ** (1.0 / N)
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        bleu *= math.exp(1 - 1 / ratio)
    return float(bleu)


def bleu4(candidates: dict, references: dict) -> float:
    """Corpus BLEU-4 of `{id: caption}` against `{id: [reference, ...]}` (COCO tokenisation)."""
    return bleu4_from_stats(list(bleu4_stats(candidates, references).values()))
