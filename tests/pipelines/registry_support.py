"""Registry test support: tiny checkpoints and report cards with chosen hit rates (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import torch as safetensors_torch

from pipelines.core.checkpoints import RESUME_FILES
from pipelines.core.records import RATIO_METRICS, metric_value


def make_checkpoint(root: Path, seed: int) -> Path:
    ckpt = root / f"ckpt-{seed}"
    ckpt.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    safetensors_torch.save_file({"w": torch.randn(8, 4, generator=g)}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"preset": "debug", "seed": seed}))
    (ckpt / "tokenizer.json").write_text(json.dumps({"vocab": ["a", "b"]}))
    for name in RESUME_FILES:  # training state: must not be registered
        (ckpt / name).write_bytes(b"\0" * 64)
    return ckpt


def make_report(root: Path, hits: np.ndarray, benchmark: str = "dsv1:abc", tag: str = "r") -> dict:
    out = root / f"eval-{tag}"
    out.mkdir(parents=True)
    records = [
        {"key": f"k{i:04d}", "i2t_rank": 0 if h else 7, "t2i_ranks": [0 if h else 7],
         "generated": "x", "references": ["x"], "bleu_stats": [1, 1, 1, 0, 0, 0, 1, 0, 0, 0], "cider_d": 0.0,
         "vqa": [], "itm": {"pos_logit": 1.0, "neg_logit": -1.0, "neg_key": "k", "correct": 2}}
        for i, h in enumerate(hits)
    ]
    per_sample = out / "per_sample.jsonl"
    per_sample.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {m: metric_value(records, m) for m in RATIO_METRICS}
    card = out / "report_card.json"
    card.write_text(json.dumps({"metrics": metrics, "benchmark": benchmark}))
    return {"metrics": metrics, "benchmark": benchmark, "dataset_version": benchmark.split(":")[0],
            "report_card_path": str(card), "per_sample_path": str(per_sample)}


def hits(rate_pct: int, n: int = 200) -> np.ndarray:
    """Deterministic hit vectors: the first `rate_pct`% of samples are hits (nested sets)."""
    return (np.arange(n) < n * rate_pct // 100).astype(int)


LINEAGE = {"dataset_version": "dsv1", "config_hash": "cfg123", "code_version": "deadbeef",
           "parent_checkpoint": "/ckpt/pretrain"}
