"""Per-sample evaluation records: their file and their metrics. The one place that aggregates them.

Evaluation writes the records (`write_records`), the registry and the gate read them
(`read_records`). A per-sample record (one line of `per_sample.jsonl`, one test image) holds everything any
metric needs, so that a metric can be recomputed, and bootstrapped, from the file alone:

    {"key": str,
     "i2t_rank": int,          # 0-based rank of the best-ranked own caption among all captions
     "t2i_ranks": [int, ...],  # per own caption: 0-based rank of this image among all images
     "generated": str, "references": [str, ...],
     "bleu_stats": [10 floats], # mmcore.metrics.bleu4_stats of this caption (n-gram counts)
     "cider_d": float,          # this caption's CIDEr-D (document frequencies of the whole split)
     "vqa": [{"question", "answers", "predicted", "score", "type"}],  # type: mmcore QUESTION_TYPES
     "itm": {"pos_logit", "neg_logit", "neg_key", "correct": int},   # correct out of 2 pairs
     "grounding": [tp, fp, fn] or None}  # object phrases of `generated` against the scene's
                                         # objects, where the sample lists them (synthetic set)

and, for a model with an audio encoder (`pipelines.evaluate.audio`):

     "asr": {"reference", "hypothesis", "errors": int, "words": int} or None,  # the spoken caption
     "audio_caption": {"generated", "bleu_stats"} or None,  # written from the image and the clip
     "a2t_rank": int or None, "t2a_rank": int or None,  # audio-text retrieval among the clips
     "spoken_vqa": [{"question", "answers", "predicted", "score", "type"}]    # spoken questions

`asr_wer` is the word error rate: summed errors (substitutions, deletions, insertions) over summed
reference words.

Ratio metrics (recalls, VQA and ITM accuracy, CIDEr-D) are sums of per-sample numerators over
sums of denominators, so a resampled subset is scored with two array sums. BLEU-4 is a corpus
metric: summed n-gram statistics go through `mmcore.metrics.bleu4_from_stats` (`audio_caption_bleu4`
the same over the records with an audio caption). Ranks are 0-based
as in `mmcore.metrics.retrieval_ranks` (a hit at K means rank < K).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmcore.metrics.grounding import QUESTION_TYPES

PER_SAMPLE = "per_sample.jsonl"  # the file's name in an evaluation folder and in a run's `eval/`
KS = (1, 5, 10)
RETRIEVAL_METRICS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS)
VQA_TYPE_METRICS = tuple(f"vqa_{t}" for t in QUESTION_TYPES)
AUDIO_RATIO_METRICS = ("asr_wer", *(f"{d}_r{k}" for d in ("a2t", "t2a") for k in KS), "spoken_vqa_acc")
AUDIO_METRICS = (*AUDIO_RATIO_METRICS, "audio_caption_bleu4")  # None for a model without audio
RATIO_METRICS = (RETRIEVAL_METRICS + ("vqa_acc", "itm_acc", "cider_d", "grounding_f1") + VQA_TYPE_METRICS
                 + AUDIO_RATIO_METRICS)
CORPUS_METRICS = ("bleu4", "audio_caption_bleu4")
ALL_METRICS = RATIO_METRICS + CORPUS_METRICS


class MetricError(ValueError):
    """A metric name that is unknown, or cannot be computed from these per-sample records."""


def _check(metric: str) -> None:
    if metric not in ALL_METRICS:
        raise MetricError(f"unknown metric {metric!r}; choose one of {', '.join(ALL_METRICS)}")


def ratio_terms(records: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample numerator and denominator, each `(N,)` float64, for a ratio metric."""
    _check(metric)
    if metric.startswith("i2t_r"):
        k = int(metric[5:])
        num = [float(r["i2t_rank"] < k) for r in records]
        den = [1.0] * len(records)
    elif metric.startswith("t2i_r"):
        k = int(metric[5:])
        num = [float(sum(rank < k for rank in r["t2i_ranks"])) for r in records]
        den = [float(len(r["t2i_ranks"])) for r in records]
    elif metric in ("vqa_acc", "spoken_vqa_acc"):
        field = metric[: -len("_acc")]
        num = [float(sum(q["score"] for q in r.get(field, []))) for r in records]
        den = [float(len(r.get(field, []))) for r in records]
    elif metric == "asr_wer":
        num = [float(r["asr"]["errors"]) if r.get("asr") else 0.0 for r in records]
        den = [float(r["asr"]["words"]) if r.get("asr") else 0.0 for r in records]
    elif metric[:5] in ("a2t_r", "t2a_r"):
        k, field = int(metric[5:]), f"{metric[:3]}_rank"
        num = [float(r[field] < k) if r.get(field) is not None else 0.0 for r in records]
        den = [1.0 if r.get(field) is not None else 0.0 for r in records]
    elif metric in VQA_TYPE_METRICS:
        kind = metric[4:]
        num = [float(sum(q["score"] for q in r.get("vqa", []) if q.get("type") == kind)) for r in records]
        den = [float(sum(q.get("type") == kind for q in r.get("vqa", []))) for r in records]
    elif metric == "grounding_f1":  # 2 TP / (2 TP + FP + FN), summed over captions
        counts = [r.get("grounding") or (0, 0, 0) for r in records]
        num = [2.0 * tp for tp, _, _ in counts]
        den = [2.0 * tp + fp + fn for tp, fp, fn in counts]
    elif metric == "cider_d":
        num = [float(r["cider_d"]) for r in records]
        den = [1.0] * len(records)
    elif metric == "itm_acc":
        num = [float(r["itm"]["correct"]) if r.get("itm") else 0.0 for r in records]
        den = [2.0 if r.get("itm") else 0.0 for r in records]
    else:
        raise MetricError(f"{metric} is a corpus metric, not a ratio of per-sample terms")
    return np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)


def corpus_metric(records: Sequence[dict], metric: str) -> float:
    """BLEU-4 of the generated captions (`audio_caption_bleu4`: of the captions written with the
    spoken description) from their per-sample n-gram statistics (mmcore's code)."""
    from mmcore.metrics import bleu4_from_stats

    _check(metric)
    if metric not in CORPUS_METRICS:
        raise MetricError(f"{metric} is a ratio metric; use ratio_terms")
    if metric == "audio_caption_bleu4" and not any(r.get("audio_caption") for r in records):
        return None
    return bleu4_from_stats(bleu_stats(records, metric))


def bleu_stats(records: Sequence[dict], metric: str) -> np.ndarray:
    """`(N, 10)` per-sample BLEU-4 statistics of a corpus metric; a record without the caption
    (`audio_caption_bleu4` on a sample without audio) has a row of zeros, which adds nothing."""
    if metric == "audio_caption_bleu4":
        rows = [r["audio_caption"]["bleu_stats"] if r.get("audio_caption") else [0.0] * 10 for r in records]
    else:
        rows = [r["bleu_stats"] for r in records]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 10)


def metric_value(records: Sequence[dict], metric: str) -> float | None:
    """One metric over these records; None when no record carries what it needs (e.g. no QA)."""
    if metric in CORPUS_METRICS:
        return corpus_metric(records, metric) if records else None
    num, den = ratio_terms(records, metric)
    total = den.sum()
    return float(num.sum() / total) if total > 0 else None


def compute_metrics(records: Sequence[dict]) -> dict[str, float | None]:
    """Every report-card metric from the per-sample records (fractions in [0, 1] for ratios)."""
    return {m: metric_value(records, m) for m in ALL_METRICS}


def write_records(out_dir: str | os.PathLike, records: Sequence[dict]) -> Path:
    """`out_dir/per_sample.jsonl`, one record a line (keys sorted); returns its path."""
    path = Path(out_dir) / PER_SAMPLE
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a per-sample file written by `write_records`."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
