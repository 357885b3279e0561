"""bench/gpu.py, the one GPU measurement script, runs its whole CPU dry path (every part: the MFU
ladder with torch.compile, the ResNet layouts, the profiler summary, the loader against the model,
DDP through torchrun) and writes its figures, so it is not broken when a GPU is finally lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_dry_run_on_cpu_writes_every_figure(tmp_path):
    out = tmp_path / "figures"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mfu = json.loads((out / "mfu.json").read_text())
    assert [r["change"] for r in mfu["ladder"]] == ["eager, foreach AdamW", "+ fused AdamW", "+ torch.compile",
                                                    "+ batch 8"]
    assert all(r["samples_per_s"] > 0 and r["loss"] == r["loss"] for r in mfu["ladder"])
    # SDPA in every attention, BERT's included: one call per attention layer of the forward.
    assert mfu["bert_attn_implementation"] == "sdpa"
    assert all(r["sdpa_calls"] == r["attention_layers"] == 10 for r in mfu["ladder"])
    assert [r["layout"] for r in mfu["resnet50_layout"]] == ["NCHW", "channels_last"]
    profile = json.loads((out / "profile.json").read_text())
    assert profile["top"] and 0 < profile["gemm_share"] <= 1
    loader = json.loads((out / "loader.json").read_text())
    assert loader["samples_per_s"] > 0 and loader["ratio"] == pytest.approx(
        loader["samples_per_s"] / loader["model_samples_per_s"])
    nccl = json.loads((out / "nccl.json").read_text())
    assert nccl["returncode"] == 0 and "replicas identical: True" in nccl["output"]
    text = (out / "summary.md").read_text()
    for heading in ("MFU ladder", "ResNet-50 layout", "Profile", "Loader vs model", "NCCL"):
        assert heading in text


def test_gpu_script_without_a_gpu_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
