"""The MLflow registry on a real SQLite store in a temporary directory (and once via a real server).

Checkpoints here are plain files (a safetensors blob, config, tokenizer, training state): the
registry moves files and metadata, it never needs to load a model. Per-sample results are
synthetic so the gate's outcome is known in advance.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import load_config
from pipelines.core.checkpoints import RESUME_FILES
from pipelines.core.model_uri import ModelURIError
from pipelines.core.records import RATIO_METRICS, metric_value
from pipelines.registry import list_models, register_and_gate, resolve_model, rollback, show
from pipelines.registry import register as register_mod

safetensors_torch = pytest.importorskip("safetensors.torch")
torch = pytest.importorskip("torch")


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything MLflow wrote to ./mlruns would show up here
    return load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.bootstrap_samples=300"])


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


def test_gate_sequence_tags_and_rollback(cfg, tmp_path):
    a = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30), tag="a"), LINEAGE)
    assert a["promoted"] and a["champion_version"] == a["version"] and "no champion" in a["reason"]
    worse = register_and_gate(cfg, make_checkpoint(tmp_path, 2), make_report(tmp_path, hits(25), tag="b"), LINEAGE)
    assert not worse["promoted"] and worse["champion_version"] == a["version"]
    better = register_and_gate(cfg, make_checkpoint(tmp_path, 3), make_report(tmp_path, hits(50), tag="c"), LINEAGE)
    assert better["promoted"] and better["champion_version"] == better["version"]

    info = show(cfg, f"{cfg.registry.model_name}@champion")
    assert info["version"] == better["version"] and "champion" in info["aliases"]
    tags = info["tags"]
    assert tags["dataset_version"] == "dsv1" and tags["config_hash"] == "cfg123"
    assert tags["code_version"] == "deadbeef" and tags["parent_checkpoint"] == "/ckpt/pretrain"
    assert tags["benchmark"] == "dsv1:abc" and tags["previous_champion"] == a["version"]
    assert tags["gate.promote"] == "True" and float(tags["gate.ci_low"]) > 0
    assert info["metrics"]["i2t_r1"] == pytest.approx(0.5)
    rejected = show(cfg, f"{cfg.registry.model_name}/{worse['version']}")["tags"]
    assert rejected["gate.promote"] == "False" and "margin" in rejected["gate.reason"]

    listed = list_models(cfg)
    assert [v["version"] for v in listed[0]["versions"]] == ["3", "2", "1"]
    back = rollback(cfg, cfg.registry.model_name)
    assert back["champion"] == a["version"]
    assert show(cfg, cfg.registry.model_name)["version"] == a["version"]
    with pytest.raises(ModelURIError, match="nothing to roll back"):
        rollback(cfg, cfg.registry.model_name)
    assert not (tmp_path / "mlruns").exists()


def test_different_benchmark_is_never_compared_silently(cfg, tmp_path):
    register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(10), tag="a"), LINEAGE)
    other = make_report(tmp_path, hits(90), benchmark="dsv2:fff", tag="b")
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 2), other, LINEAGE)
    assert not res["promoted"] and "not compared" in res["reason"]
    assert "dsv2:fff" in res["reason"] and "dsv1:abc" in res["reason"]


def test_champion_re_evaluated_on_new_benchmark_is_compared(cfg, tmp_path):
    """A nightly run on a new dataset version passes the champion's evaluation on its benchmark."""
    from pipelines.registry import champion_benchmark

    first = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(10), tag="a"), LINEAGE)
    assert champion_benchmark(cfg) == (first["version"], "dsv1:abc")
    champ_on_v2 = {**make_report(tmp_path, hits(20), benchmark="dsv2:fff", tag="c"), "version": first["version"]}
    better = make_report(tmp_path, hits(60), benchmark="dsv2:fff", tag="b")
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 2), better, LINEAGE, champion_report=champ_on_v2)
    assert res["promoted"] and "re-evaluated on dsv2:fff" in res["reason"]
    # a report of some other version is not taken for the champion's
    stale = {**champ_on_v2, "version": "999"}
    worse = make_report(tmp_path, hits(5), benchmark="dsv3:eee", tag="d")
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 3), worse, LINEAGE, champion_report=stale)
    assert not res["promoted"] and "not compared" in res["reason"]


def test_resolve_round_trip_gives_identical_files(cfg, tmp_path):
    ckpt = make_checkpoint(tmp_path, 5)
    res = register_and_gate(cfg, ckpt, make_report(tmp_path, hits(40)), LINEAGE)
    for uri in (f"models:/{res['name']}@champion", res["model_uri"]):
        local = resolve_model(cfg, uri)
        names = sorted(p.name for p in local.iterdir())
        assert names == ["config.json", "model.safetensors", "tokenizer.json"]  # no resume files
        for n in names:
            assert (local / n).read_bytes() == (ckpt / n).read_bytes()
    assert resolve_model(cfg, ckpt) == ckpt.resolve()
    with pytest.raises(ModelURIError, match="not found in the registry"):
        resolve_model(cfg, f"models:/{res['name']}@nope")
    with pytest.raises(ModelURIError, match="bad model URI"):
        resolve_model(cfg, "models:/just/too/many")


def test_racing_registrations_leave_the_best_champion(cfg, tmp_path, monkeypatch):
    """Two challengers both beat the champion; whichever order the lock grants, the best wins."""
    real_register = register_mod.register_version
    for trial, (first, second) in enumerate([(50, 80), (80, 50)]):
        cfg.registry.model_name = f"race-{trial}"
        monkeypatch.setattr(register_mod, "register_version", real_register)
        base = make_report(tmp_path, hits(20), tag=f"base{trial}")
        register_and_gate(cfg, make_checkpoint(tmp_path / f"b{trial}", 1), base, LINEAGE)
        barrier = threading.Barrier(2)
        delay = {first: 0.0, second: 0.3}

        def slow_register(cfg_, ckpt, report, lineage, barrier=barrier, delay=delay):
            mv = real_register(cfg_, ckpt, report, lineage)
            barrier.wait(timeout=60)  # both versions exist before either reaches the gate
            time.sleep(delay[int(round(report["metrics"]["i2t_r1"] * 100))])
            return mv

        monkeypatch.setattr(register_mod, "register_version", slow_register)
        results = {}

        def worker(pct, seed, trial=trial, results=results):
            report = make_report(tmp_path, hits(pct), tag=f"t{trial}-{pct}")
            results[pct] = register_and_gate(cfg, make_checkpoint(tmp_path / f"t{trial}", seed), report, LINEAGE)

        threads = [threading.Thread(target=worker, args=(p, 10 * trial + p)) for p in (first, second)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        assert set(results) == {50, 80}
        champ = show(cfg, cfg.registry.model_name)
        assert champ["version"] == results[80]["version"], (trial, results)
        assert champ["metrics"]["i2t_r1"] == pytest.approx(0.8)
