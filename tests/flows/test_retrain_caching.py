"""Unchanged work is not redone, on Prefect's test harness, real local Ray and MLflow on SQLite:
the ingest flow on unchanged data returns the same dataset version without rewriting it, and
the retrain flow, when data, config and code are those the champion was trained on, trains
nothing and says why (in the summary and as an artifact; also printed), after retrying its
first step's connection to Ray. No capsys here: Prefect's console log handler would keep the
captured stream after the test closed it. No training runs here: the champion is a registered
file checkpoint whose lineage names this dataset, config and code."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_unchanged_data_is_not_reingested_and_unchanged_retrain_is_skipped(
        prefect_harness, ray_local, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from registry_support import hits, make_checkpoint, make_report

    from flows.ingest import ingest
    from flows.retrain import retrain
    from pipelines.config import load_config
    from pipelines.ingest.synth import synthesize
    from pipelines.registry import register_and_gate
    from pipelines.registry.lineage import code_hash

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = synthesize(tmp_path / "raw", 60, seed=3)
    overrides = [f"services.home={tmp_path / 'home'}", f"data.source={source}", "data.format=jsonl",
                 "flow.retry_backoff_s=0.1"]
    first = Path(ingest(str(source), "jsonl", "debug", overrides))
    manifest = first / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert Path(ingest(str(source), "jsonl", "debug", overrides)) == first
    assert manifest.stat().st_mtime_ns == written  # the version was reused, not rewritten

    cfg = load_config("debug", overrides)
    lineage = {"dataset_version": first.name, "config_hash": cfg.hash(), "code_hash": code_hash()}
    champion = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30)), lineage)

    # The Ray cluster is away at the first try: connecting is part of the first step, which retries.
    import flows.retrain as retrain_module

    connects: list[int] = []

    def flaky_init_ray(cfg):
        connects.append(1)
        if len(connects) == 1:
            raise ConnectionError("Ray's GCS at 127.0.0.1:6379 is not reachable")
        return real_init_ray(cfg)

    real_init_ray = retrain_module.init_ray
    monkeypatch.setattr(retrain_module, "init_ray", flaky_init_ray)
    state = retrain(config="debug", overrides=overrides, return_state=True)
    summary = state.result()
    assert len(connects) == 2
    assert summary["dataset_reused"] is True and summary["data_dir"] == str(first)
    assert f"v{champion['version']}" in summary["skipped"] and "training skipped" in summary["skipped"]
    assert not (tmp_path / "home" / "ray_results").exists()  # no training run started
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (skipped,) = [a for a in found if a.key == "retrain-skipped"]
    assert "nothing changed since champion" in skipped.data and first.name in skipped.data
