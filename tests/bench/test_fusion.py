"""bench/fusion.py runs the real `mmfusion run` once per fusion and seed, keeps each result, reuses
kept ones, and tabulates them; here with a gated model on the debug config (seconds of training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]


def test_fusion_bench_trains_a_real_run_and_reuses_kept_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    # A kept result (as an interrupted bench leaves it) is read, not trained again.
    kept = {"fusion": "concat", "seed": 0, "wall_s": 123.0, "params": 4321, "itm_calibration": None,
            "metrics": {"i2t_r1": 0.25, "itm_acc": 0.5, "vqa_acc": 0.125, "grounding_f1": 0.75, "bleu4": 0.5}}
    (results / "concat-0.json").write_text(json.dumps(kept))
    out = tmp_path / "fusion.md"
    env = {**os.environ, "MMFUSION_HOME": str(tmp_path / "unused-home"), "PYTHONPATH": ""}
    cmd = [sys.executable, str(ROOT / "bench" / "fusion.py"), "--config", "debug", "--seeds", "1",
           "--fusions", "gated,concat", "--results", str(results), "--out", str(out), "--set", "data.synth_num=200"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "concat seed 0: kept result" in proc.stdout and "gated seed 0 done" in proc.stdout
    gated = json.loads((results / "gated-0.json").read_text())
    # A real, evaluated gated model (the bench checks the checkpoint's fusion): its report card's
    # metrics, and its parameters counted from the checkpoint.
    assert gated["fusion"] == "gated" and gated["wall_s"] > 0 and gated["params"] > 100_000
    assert 0.0 <= gated["metrics"]["vqa_acc"] <= 1.0 and "grounding_f1" in gated["metrics"]
    table = out.read_text()
    assert "| metric | gated | concat |" in table
    assert "| grounding_f1 | " in table and "0.750 ± 0.000 |" in table  # the kept run's value, one seed
    assert "| parameters | " in table and "4,321 |" in table
    assert f"| gated | 0 | {gated['metrics']['itm_acc']:.3f} |" in table
    # Settings the bench owns are refused, naming the way to vary them.
    bad = subprocess.run([*cmd[:2], "--set", "train.seed=3"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "use --fusions / --seeds" in bad.stderr
