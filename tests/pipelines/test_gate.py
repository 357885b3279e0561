"""The promotion gate on synthetic per-sample results: exact, fast, no MLflow."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.core.records import metric_value
from pipelines.registry.gate import GateError, decide


def records(hits: np.ndarray, seed: int = 0) -> list[dict]:
    """One record per sample; `hits[i]` = 1 when the image's own caption ranks first."""
    rng = np.random.default_rng(seed)
    out = []
    for i, h in enumerate(hits):
        rank = 0 if h else int(rng.integers(1, 20))
        out.append(
            {
                "key": f"s{i:04d}",  # ranks are 0-based: a hit at 1 is rank 0
                "i2t_rank": rank,
                "t2i_ranks": [rank, rank + 1],
                "generated": "a red square",
                "references": ["a red square"],
                "bleu_stats": [3, 3, 3, 2, 1, 0, 3, 2, 1, 0],
                "cider_d": float(h),
                "vqa": [{"question": "q", "answers": ["a"], "predicted": "a", "score": float(h)}],
                "itm": {"pos_logit": 1.0, "neg_logit": -1.0, "neg_key": "x", "correct": 2},
            }
        )
    return out


def hits_with_rate(n: int, rate: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < rate).astype(int)


def test_clearly_better_challenger_is_promoted():
    base = hits_with_rate(400, 0.3, seed=1)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:100]] = 1  # 100 more hits, none lost
    d = decide(records(better), records(base), "i2t_r1", samples=500)
    assert d.promote, d.reason
    assert d.delta == pytest.approx(100 / 400)
    assert d.ci_low > 0 and d.p_value < 0.05


def test_equal_challenger_is_not_promoted():
    base = hits_with_rate(200, 0.4, seed=2)
    d = decide(records(base), records(base), "i2t_r1", samples=300)
    assert not d.promote
    assert d.delta == 0 and "margin" in d.reason


def test_noisy_improvement_is_not_promoted():
    # Same hit rate, different samples: a small observed gain that is only noise.
    base = hits_with_rate(60, 0.5, seed=3)
    noisy = base.copy()
    flip = np.random.default_rng(4).choice(60, size=20, replace=False)
    noisy[flip] = 1 - noisy[flip]
    if noisy.sum() <= base.sum():  # make sure the point estimate favours the challenger
        noisy, base = base, noisy
    assert noisy.sum() > base.sum()
    d = decide(records(noisy), records(base), "i2t_r1", samples=500)
    assert not d.promote
    assert "noise" in d.reason and d.ci_low <= 0


def test_worse_challenger_is_not_promoted_and_lower_is_better_flips():
    base = hits_with_rate(300, 0.6, seed=5)
    worse = base.copy()
    worse[np.flatnonzero(base == 1)[:90]] = 0
    assert not decide(records(worse), records(base), "i2t_r1", samples=300).promote
    # For a lower-is-better metric the same numbers favour the "worse" one.
    assert decide(records(worse), records(base), "i2t_r1", higher_is_better=False, samples=300).promote


def test_margin_blocks_small_real_gains():
    base = hits_with_rate(400, 0.3, seed=6)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1  # +0.10
    assert decide(records(better), records(base), "i2t_r1", samples=300).promote
    d = decide(records(better), records(base), "i2t_r1", margin=0.15, samples=300)
    assert not d.promote and "margin" in d.reason


def test_gate_is_deterministic_and_uses_other_ratio_metrics():
    hits_a, hits_b = hits_with_rate(100, 0.7, 7), hits_with_rate(100, 0.5, 8)
    a, b = records(hits_a), records(hits_b)
    d1 = decide(a, b, "vqa_acc", samples=200)
    d2 = decide(a, b, "vqa_acc", samples=200)
    assert d1 == d2
    # one question per record, scored 1 on a hit: VQA accuracy is the hit rate
    assert d1.challenger == pytest.approx(hits_a.mean()) and d1.champion == pytest.approx(hits_b.mean())
    assert d1.delta == pytest.approx(hits_a.mean() - hits_b.mean())


def test_different_samples_are_refused():
    a = records(hits_with_rate(10, 0.5, 9))
    b = [dict(r, key=r["key"] + "x") for r in a]
    with pytest.raises(GateError, match="different test samples"):
        decide(a, b, "i2t_r1")


def test_ratio_metrics_from_records():
    recs = records(np.array([1, 0, 1, 1]))
    m = {k: metric_value(recs, k) for k in ("i2t_r1", "t2i_r1", "vqa_acc", "itm_acc")}
    assert m["i2t_r1"] == 0.75
    assert m["t2i_r1"] == 3 / 8  # each image: rank and rank+1; only rank 1 counts at k=1
    assert m["vqa_acc"] == 0.75 and m["itm_acc"] == 1.0


def test_caption_metrics_bootstrap_from_per_sample_terms():
    base = hits_with_rate(150, 0.3, seed=10)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:60]] = 1
    a, b = records(better), records(base)
    for r in a:  # the better model's captions also share more n-grams with the references
        r["bleu_stats"] = [3, 3, 3, 2, 1, 0, 3, 2, 1, 0] if r["cider_d"] else [3, 3, 3, 2, 1, 0, 1, 0, 0, 0]
    for r in b:
        r["bleu_stats"] = [3, 3, 3, 2, 1, 0, 3, 2, 1, 0] if r["cider_d"] else [3, 3, 3, 2, 1, 0, 1, 0, 0, 0]
    assert decide(a, b, "cider_d", samples=300).promote
    assert decide(a, b, "bleu4", samples=300).promote
    assert not decide(b, a, "bleu4", samples=300).promote


def test_audio_caption_bleu_gates_on_the_samples_with_audio():
    """`audio_caption_bleu4` reads each record's `audio_caption` statistics; a sample without audio
    adds nothing to either model's corpus."""
    good, poor = [3, 3, 3, 2, 1, 0, 3, 2, 1, 0], [3, 3, 3, 2, 1, 0, 1, 0, 0, 0]
    a, b = records(np.ones(120, dtype=int)), records(np.ones(120, dtype=int))
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        silent = i % 4 == 0
        ra["audio_caption"] = None if silent else {"generated": "x", "bleu_stats": good}
        rb["audio_caption"] = None if silent else {"generated": "x", "bleu_stats": poor if i % 2 else good}
    assert metric_value(a, "audio_caption_bleu4") > metric_value(b, "audio_caption_bleu4") > 0
    assert decide(a, b, "audio_caption_bleu4", samples=300).promote
    assert not decide(b, a, "audio_caption_bleu4", samples=300).promote
    # The plain caption BLEU is the same for both: the audio captions are not mixed into it.
    assert metric_value(a, "bleu4") == metric_value(b, "bleu4")
    assert metric_value(records(np.ones(3, dtype=int)), "audio_caption_bleu4") is None
