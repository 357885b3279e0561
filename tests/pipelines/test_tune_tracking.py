"""The Tune callback that logs trials to MLflow, driven by hand (no search): it holds a URI, not a
config (Tune pickles it), and gets its client from `pipelines.core.mlflow.client_at`."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from pipelines.tune.tracking import TrialsToMlflow


def test_a_search_and_its_trials_become_mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    location = (tmp_path / "artifacts" / "exp-tune").as_uri()
    tracker = TrialsToMlflow(uri, "exp-tune", "s", max_reports=2, params={"metric": "val_loss"},
                             artifact_location=location)
    tracker = pickle.loads(pickle.dumps(tracker))  # as Tune may do; no client travels
    tracker.setup()
    trial = SimpleNamespace(trial_id="a1", config={"train.lr": 0.003})
    tracker.on_trial_start(0, [trial], trial)
    tracker.on_trial_result(0, [trial], trial, {"val_loss": 1.5, "phase": "final", "training_iteration": 2})
    tracker.on_trial_complete(0, [trial], trial)
    tracker.log_best("a1", 1.5)

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("exp-tune")
    assert exp.artifact_location == location
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent, child = runs["s"], runs["s-a1"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["train.lr"] == "0.003" and child.data.tags["tune.status"] == "done"
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val_loss")] == [(2, 1.5)]
    assert parent.data.tags["tune.best_trial"] == "a1" and parent.data.metrics["best_score"] == 1.5
    assert parent.info.status == child.info.status == "FINISHED"
