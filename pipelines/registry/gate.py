"""The promotion gate: beat the champion by more than a margin, and not by luck.

The test is a paired bootstrap over test images: both models' per-sample results are aligned
by sample key, image indices are resampled with replacement, and the metric difference is
recomputed on every resample. The challenger wins only when the observed difference exceeds
the margin AND the one-sided lower confidence bound of the difference is above zero. The
random generator is seeded, so the same inputs always give the same decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipelines.core.records import CORPUS_METRICS, bleu_stats, metric_value, ratio_terms


class GateError(ValueError):
    """The two models cannot be compared (different samples, unknown metric)."""


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    metric: str
    challenger: float | None = None
    champion: float | None = None
    delta: float | None = None  # signed so that > 0 means the challenger is better
    ci_low: float | None = None  # lower bound of delta at `confidence` (one-sided)
    p_value: float | None = None  # share of resamples where the challenger is not better
    confidence: float | None = None
    margin: float | None = None
    bootstrap_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def align(challenger: Sequence[dict], champion: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Pair records by `key`; both must cover exactly the same test samples."""
    a = {r["key"]: r for r in challenger}
    b = {r["key"]: r for r in champion}
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise GateError(
            f"per-sample results cover different test samples ({len(only_a)} only in the "
            f"challenger, e.g. {only_a[:3]}; {len(only_b)} only in the champion, e.g. {only_b[:3]}); "
            "evaluate both models on the same dataset version's test split"
        )
    keys = sorted(a)
    return [a[k] for k in keys], [b[k] for k in keys]


def bootstrap_deltas(
    challenger: Sequence[dict], champion: Sequence[dict], metric: str, samples: int, seed: int = 0
) -> np.ndarray:
    """`(samples,)` differences challenger - champion of `metric` over paired resamples."""
    n = len(challenger)
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    if metric in CORPUS_METRICS:  # BLEU-4: resample per-sample n-gram statistics
        from mmcore.metrics import bleu4_from_stats

        sa, sb = bleu_stats(challenger, metric), bleu_stats(champion, metric)
        return np.array([bleu4_from_stats(sa[rows]) - bleu4_from_stats(sb[rows]) for rows in idx])
    num_a, den = ratio_terms(challenger, metric)
    num_b, den_b = ratio_terms(champion, metric)
    if not np.array_equal(den, den_b):
        raise GateError(f"{metric}: the two results count different captions/questions per sample")
    dens = den[idx].sum(axis=1)
    dens[dens == 0] = np.nan  # a resample without any QA pair carries no information
    deltas = (num_a[idx].sum(axis=1) - num_b[idx].sum(axis=1)) / dens
    return deltas[~np.isnan(deltas)]


def decide(
    challenger: Sequence[dict],
    champion: Sequence[dict],
    metric: str,
    *,
    higher_is_better: bool = True,
    margin: float = 0.0,
    confidence: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> GateDecision:
    """Compare per-sample results of two models on the same test split; see module doc."""
    if not 0.5 <= confidence < 1.0:
        raise GateError(f"registry.confidence must be in [0.5, 1), got {confidence}")
    a, b = align(challenger, champion)
    va, vb = metric_value(a, metric), metric_value(b, metric)
    common = dict(metric=metric, challenger=va, champion=vb, confidence=confidence, margin=margin)
    if va is None or vb is None:
        return GateDecision(False, f"{metric} cannot be computed on this test split", **common)
    sign = 1.0 if higher_is_better else -1.0
    delta = sign * (va - vb)
    deltas = sign * bootstrap_deltas(a, b, metric, samples, seed)
    ci_low = float(np.quantile(deltas, 1.0 - confidence)) if deltas.size else 0.0
    p_value = float(np.mean(deltas <= 0)) if deltas.size else 1.0
    stats = dict(delta=delta, ci_low=ci_low, p_value=p_value, bootstrap_samples=int(deltas.size))
    where = f"{metric}: challenger {va:.4f} vs champion {vb:.4f} (delta {delta:+.4f})"
    if delta <= margin:
        reason = f"not better by more than the margin {margin}: {where}"
        return GateDecision(False, reason, **common, **stats)
    if ci_low <= 0.0:
        reason = (
            f"improvement may be noise: {where}, {confidence:.0%} lower bound {ci_low:+.4f} <= 0 "
            f"(p={p_value:.3f}, {deltas.size} paired bootstrap resamples)"
        )
        return GateDecision(False, reason, **common, **stats)
    reason = (
        f"better: {where}, margin {margin}, {confidence:.0%} lower bound {ci_low:+.4f} > 0 "
        f"(p={p_value:.3f})"
    )
    return GateDecision(True, reason, **common, **stats)
