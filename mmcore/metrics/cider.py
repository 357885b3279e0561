"""CIDEr-D as the COCO caption evaluation computes it (pycocoevalcap's `Cider`: tf-idf n-gram
cosine with clipping and a Gaussian length penalty, sigma 6, x10), per sample and averaged.

Document frequencies come from the references of the evaluated set itself, as in pycocoevalcap,
so per-sample scores depend on the whole set; bootstrap by averaging resampled per-sample scores.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from mmcore.metrics.bleu import _check, _ngrams
from mmcore.metrics.ptb_tokenize import ptb_tokenize

N, SIGMA = 4, 6.0


def _vector(counts: Counter, df: dict, log_num_docs: float):
    """tf-idf vectors per n-gram order, their norms, and the "length" pycocoevalcap uses (which,
    by an index quirk we must keep, counts bigrams rather than words)."""
    vec = [dict() for _ in range(N)]
    norm = [0.0] * N
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        vec[n][gram] = tf * (log_num_docs - math.log(max(1.0, df.get(gram, 0.0))))
        norm[n] += vec[n][gram] ** 2
        if n == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _similarity(hyp, ref) -> float:
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    penalty = math.exp(-((lh - lr) ** 2) / (2 * SIGMA**2))
    total = 0.0
    for n in range(N):
        val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
        if nh[n] != 0 and nr[n] != 0:
            val /= nh[n] * nr[n]
        total += val * penalty
    return total / N


def cider_d_scores(candidates: dict, references: dict) -> dict:
    """`{id: CIDEr-D}`; their mean is `cider_d(candidates, references)`."""
    _check(candidates, references)
    hyps = {k: _ngrams(ptb_tokenize(candidates[k])) for k in candidates}
    refs = {k: [_ngrams(ptb_tokenize(r)) for r in references[k]] for k in candidates}
    df: dict = defaultdict(float)
    for rs in refs.values():
        for gram in {g for r in rs for g in r}:
            df[gram] += 1
    log_docs = math.log(float(len(refs)))
    scores = {}
    for k in candidates:
        hyp = _vector(hyps[k], df, log_docs)
        sims = [_similarity(hyp, _vector(r, df, log_docs)) for r in refs[k]]
        scores[k] = 10.0 * sum(sims) / len(sims)
    return scores


def cider_d(candidates: dict, references: dict) -> float:
    """Corpus CIDEr-D of `{id: caption}` against `{id: [reference, ...]}` (COCO tokenisation)."""
    scores = cider_d_scores(candidates, references)
    return sum(scores.values()) / len(scores)
