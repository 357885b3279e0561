"""`mmfusion status`, one screen: the champion and its metrics (a real MLflow store on SQLite),
the last flow runs with states and durations and the next scheduled run, and the Ray nodes.
Prefect and Ray are stood in for here (the stack's end-to-end test has the real servers); a part
that cannot be reached says so without hiding the others."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from registry_support import LINEAGE, hits, make_checkpoint, make_report  # noqa: E402

from mmfusion.cli import main  # noqa: E402
from pipelines.config import load_config  # noqa: E402

WHEN = datetime(2026, 12, 3, 2, 0, 0, tzinfo=timezone.utc)


def _run(flow: str, name: str, state: str, duration_s: float | None) -> dict:
    return {"flow": flow, "name": name, "state": state, "start": WHEN, "duration_s": duration_s,
            "deployment_id": None}


@pytest.fixture
def home(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MMFUSION_HOME", str(tmp_path / "home"))
    return tmp_path


def test_status_shows_the_champion_runs_next_run_and_nodes(home, monkeypatch, capsys):
    from pipelines.registry import register_and_gate

    cfg = load_config("debug", ["eval.bootstrap_samples=200"])
    reg = register_and_gate(cfg, make_checkpoint(home, 1), make_report(home, hits(40)), LINEAGE)
    runs = {"runs": [_run("retrain", "smoke-run", "Completed", 82.4), _run("ingest", "raw-run", "Failed", 12.0)],
            "next": _run("retrain", "nightly-run", "Scheduled", None)}
    monkeypatch.setattr("flows.status.prefect_summary", lambda last: runs)
    nodes = [{"address": "127.0.0.1", "head": True, "cpu": 2.0, "gpu": 0.0, "memory_gb": 3.5},
             {"address": "127.0.0.1", "head": False, "cpu": 2.0, "gpu": 1.0, "memory_gb": 3.5}]
    monkeypatch.setattr("pipelines.ops.cluster.ray_nodes", lambda cfg: nodes)
    capsys.readouterr()  # what registering printed

    assert main(["status", "--config", "debug"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "champion" and lines[1].startswith(f"  {cfg.registry.model_name} v{reg['version']}  data=dsv1")
    assert "i2t_r1=0.400" in lines[2]  # the headline metrics, on the next line
    assert lines[3] == "flow runs"
    assert lines[4].split()[:3] == ["retrain", "smoke-run", "Completed"] and lines[4].endswith("82 s")
    assert lines[5].split()[:3] == ["ingest", "raw-run", "Failed"] and lines[5].endswith("12 s")
    assert lines[6] == "  next: retrain nightly-run at 2026-12-03 02:00:00 UTC"
    assert lines[7] == "ray"
    assert lines[8].split() == ["head", "127.0.0.1", "CPU", "2", "GPU", "0", "memory", "3.5", "GiB"]
    assert lines[9].split()[:1] == ["worker"] and "GPU 1" in lines[9]


def test_a_part_that_cannot_be_reached_says_why_and_the_others_still_show(home, monkeypatch, capsys):
    def no_server(last):
        raise ConnectionError("All connection attempts failed")

    monkeypatch.setattr("flows.status.prefect_summary", no_server)
    assert main(["status", "--config", "debug"]) == 0
    out = capsys.readouterr().out
    assert "no champion" in out
    assert "  unavailable: ConnectionError: All connection attempts failed" in out
    assert "no cluster (RAY_ADDRESS unset)" in out
