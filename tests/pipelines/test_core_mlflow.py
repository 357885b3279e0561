"""pipelines.core.mlflow: the training tracker on real MLflow (SQLite), a broken URI never raises,
and every experiment gets an explicit artifact location, created by the driver, never by the tracker."""

from __future__ import annotations

import time

from pipelines.config import load_config
from pipelines.core.mlflow import MlflowTracker, artifact_location, ensure_experiment


def test_metrics_reach_mlflow_and_a_resumed_run_keeps_its_id(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(MlflowClient(tracking_uri=uri), "exp", (tmp_path / "artifacts").as_uri())
    tracker = MlflowTracker(uri, "exp", "run-a")
    tracker.log_params({"lr": 0.001})
    tracker.log_metrics({"loss": 2.0, "note": "not a number"}, step=1)
    tracker.log_metrics({"loss": 1.5}, step=2)
    run_id = tracker.wait_run_id(timeout=120)
    tracker.close(timeout=120)
    assert run_id
    resumed = MlflowTracker(uri, "exp", "run-a", run_id=run_id)
    resumed.log_metrics({"loss": 1.0}, step=3)
    resumed.close(timeout=120)

    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    run = client.get_run(run_id)
    assert run.data.params["lr"] == "0.001" and run.info.run_name == "run-a"
    assert run.info.status == "FINISHED"


def test_a_broken_tracking_uri_disables_tracking_without_raising():
    tracker = MlflowTracker("bogus-scheme://nowhere", "exp", "run-b")
    t0 = time.perf_counter()
    for step in range(100):
        tracker.log_metrics({"loss": 1.0}, step=step)  # never blocks, never raises
    assert time.perf_counter() - t0 < 1.0
    tracker.close(timeout=60)
    assert tracker.run_id is None


def test_the_tracker_never_creates_the_experiment(tmp_path, monkeypatch, caplog):
    """In a Ray worker the working directory is a Ray session folder: an experiment created there
    without a location would keep its artifacts in it. Only the driver creates experiments."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    location = (tmp_path / "artifacts" / "exp-c").as_uri()
    tracker = MlflowTracker(uri, "exp-c", "run-c", artifact_location=location)
    assert tracker.wait_run_id(timeout=120) is None
    tracker.close(timeout=120)
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("exp-c") is None
    assert "driver creates it" in caplog.text
    assert not (tmp_path / "mlruns").exists()


def test_artifact_location_is_under_the_state_dir_unless_a_server_keeps_artifacts(tmp_path):
    local = load_config("debug", [f"services.home={tmp_path}", "registry.experiment=e1"])
    assert artifact_location(local) == (tmp_path / "mlartifacts" / "e1").as_uri()
    assert artifact_location(local, "e1-tune") == (tmp_path / "mlartifacts" / "e1-tune").as_uri()  # a search's
    server = load_config("debug", [f"services.home={tmp_path}", "services.mlflow_tracking_uri=http://127.0.0.1:5000"])
    assert artifact_location(server) is None


def test_experiments_open_in_the_model_training_view(tmp_path):
    """MLflow 3's UI picks an experiment's view from the `mlflow.experimentKind` tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = ensure_experiment(client, "new", (tmp_path / "a").as_uri())
    old = client.create_experiment("old", artifact_location=(tmp_path / "b").as_uri())  # made before the tag
    assert ensure_experiment(client, "old", None) == old
    for exp_id in (new, old):
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_only_core_mlflow_builds_a_client():
    """Every MLflow client comes from `client(cfg)` or `client_at(uri)`: its URI passed explicitly,
    the registry's too, MLflow quieted."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    builders = sorted(str(p.relative_to(root)) for pkg in ("mmcore", "pipelines", "flows", "mmfusion", "bench")
                      for p in (root / pkg).rglob("*.py") if "MlflowClient(" in p.read_text())
    assert builders == ["pipelines/core/mlflow.py"]
