"""The benchmark id names the evaluation protocol as well as the test shards, and the gate never
compares reports made under different settings: a changed setting is a new benchmark.

On a hand-written dataset manifest (the benchmark id reads only the manifest) and the MLflow
registry on SQLite, with the synthetic reports of test_registry.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.core.dataset import benchmark_id
from pipelines.evaluate.run import eval_protocol, metric_code_version
from pipelines.registry import register_and_gate

sys.path.insert(0, str(Path(__file__).parent))
from registry_support import LINEAGE, hits, make_checkpoint, make_report  # noqa: E402

CHANGES = ["eval.itm_rerank_k=8", "eval.audio_rerank_k=8", "eval.num_beams=3", "eval.max_len=12", "model.max_text_len=16"]


@pytest.fixture
def version_dir(tmp_path) -> Path:
    out = tmp_path / "dsv1"
    out.mkdir()
    shard = {"path": "test/shard-000000.tar", "samples": 10, "bytes": 100, "sha256": "ab" * 32}
    (out / "manifest.json").write_text(json.dumps({"version": "dsv1", "splits": {"test": [shard]}}))
    return out


@pytest.mark.parametrize("change", CHANGES)
def test_each_protocol_setting_changes_the_benchmark_id(version_dir, change):
    base = eval_protocol(load_config("debug"))
    changed = eval_protocol(load_config("debug", [change]))
    assert changed != base
    _, id_base = benchmark_id(version_dir, base)
    version, id_changed = benchmark_id(version_dir, changed)
    assert version == "dsv1" and id_changed != id_base
    assert benchmark_id(version_dir, dict(base)) == ("dsv1", id_base)  # same settings, same id
    assert id_base.startswith("dsv1:test-")


def test_the_metric_code_version_is_part_of_the_protocol(version_dir):
    base = eval_protocol(load_config("debug"))
    assert base["metric_code"] == metric_code_version() and len(base["metric_code"]) == 12
    _, id_base = benchmark_id(version_dir, base)
    _, id_new_code = benchmark_id(version_dir, {**base, "metric_code": "0" * 12})
    assert id_new_code != id_base


def report_for(tmp_path, version_dir, overrides: list[str], pct: int, tag: str) -> dict:
    protocol = eval_protocol(load_config("debug", overrides))
    _, bench = benchmark_id(version_dir, protocol)
    return {**make_report(tmp_path, hits(pct), benchmark=bench, tag=tag), "protocol": protocol}


def test_the_gate_refuses_to_compare_reports_of_different_protocols(tmp_path, version_dir, monkeypatch):
    """A challenger scored with beam search is not compared with a greedy champion: not promoted,
    however much better it looks, and the reason names the setting. Re-evaluating the champion
    under the challenger's protocol (what the retrain flow does for a new benchmark) compares."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.bootstrap_samples=200"])
    greedy = report_for(tmp_path, version_dir, [], 20, "greedy")
    first = register_and_gate(cfg, make_checkpoint(tmp_path, 1), greedy, LINEAGE)
    beams = report_for(tmp_path, version_dir, ["eval.num_beams=3"], 90, "beams")
    refused = register_and_gate(cfg, make_checkpoint(tmp_path, 2), beams, LINEAGE)
    assert not refused["promoted"] and refused["champion_version"] == first["version"]
    assert "not compared" in refused["reason"] and "num_beams 1 -> 3" in refused["reason"]

    champ_on_beams = {**report_for(tmp_path, version_dir, ["eval.num_beams=3"], 30, "champ-beams"),
                      "version": first["version"]}
    better = report_for(tmp_path, version_dir, ["eval.num_beams=3"], 90, "beams-2")
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 3), better, LINEAGE, champion_report=champ_on_beams)
    assert res["promoted"] and "re-evaluated on" in res["reason"]
