"""Each config uses its own MLflow store, and credentials in MLflow URIs never reach a log, a
printed message or a run param. Real MLflow on SQLite; a closed port of 127.0.0.1 for a server
that cannot be reached."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from pipelines.config import load_config, mlflow_tracking_uri
from pipelines.registry import register_and_gate

sys.path.insert(0, str(Path(__file__).parent))
from registry_support import LINEAGE, hits, make_checkpoint, make_report  # noqa: E402

SECRET = "s3cr3t-token"


@pytest.fixture(autouse=True)
def no_global_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions(uri: str, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{name}'")


def test_two_configs_in_one_process_each_use_their_own_store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    global_before = mlflow.get_tracking_uri()
    a = load_config("debug", [f"services.home={tmp_path / 'a'}", "eval.bootstrap_samples=100"])
    b = load_config("debug", [f"services.home={tmp_path / 'b'}", "eval.bootstrap_samples=100"])
    ra = register_and_gate(a, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30), tag="a"), LINEAGE)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # nothing for the next config to inherit
    rb = register_and_gate(b, make_checkpoint(tmp_path, 2), make_report(tmp_path, hits(40), tag="b"), LINEAGE)
    assert mlflow.get_tracking_uri() == global_before  # the process-wide MLflow state is untouched

    uri_a, uri_b = mlflow_tracking_uri(a), mlflow_tracking_uri(b)
    assert uri_a.endswith(f"{tmp_path}/a/mlflow.db") and uri_b.endswith(f"{tmp_path}/b/mlflow.db")
    name = a.registry.model_name
    (va,), (vb,) = versions(uri_a, name), versions(uri_b, name)  # one version in each store
    assert (str(va.version), str(vb.version)) == ("1", "1") and ra["promoted"] and rb["promoted"]
    assert va.tags["weights_sha256"] != vb.tags["weights_sha256"]
    assert va.source.startswith((tmp_path / "a" / "mlartifacts").as_uri())
    assert vb.source.startswith((tmp_path / "b" / "mlartifacts").as_uri())


def test_the_tracker_redacts_credentials_in_params_and_warnings(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from pipelines.core.mlflow import MlflowTracker, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(MlflowClient(tracking_uri=uri), "exp", (tmp_path / "art").as_uri())
    tracker = MlflowTracker(uri, "exp", "run")
    tracker.log_params({"mlflow_uri": f"https://alice:{SECRET}@mlflow.example.com/", "lr": 0.1})
    run_id = tracker.wait_run_id(timeout=120)
    tracker.close(timeout=120)
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert params == {"mlflow_uri": "https://***@mlflow.example.com/", "lr": "0.1"}

    port = closed_port()
    broken = MlflowTracker(f"http://alice:{SECRET}@127.0.0.1:{port}", "exp", "run")
    broken.wait_run_id(timeout=60)
    broken.close(timeout=60)
    assert f"http://***@127.0.0.1:{port}" in caplog.text  # the warning says where, not who
    assert SECRET not in caplog.text


def test_registry_runs_and_errors_never_show_credentials(tmp_path, caplog, capsys):
    from mlflow import MlflowClient

    from pipelines.core.model_uri import ModelURIError, resolve_model

    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.bootstrap_samples=100",
                                f"train.storage=s3://AKIAX:{SECRET}@bucket/runs"])
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30)), LINEAGE)
    params = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg)).get_run(res["run_id"]).data.params
    assert params["train.storage"] == "s3://***@bucket/runs"

    port = closed_port()
    server = load_config("debug", [f"services.home={tmp_path / 'home'}",
                                   f"services.mlflow_tracking_uri=http://alice:{SECRET}@127.0.0.1:{port}"])
    with pytest.raises(ModelURIError) as err:
        resolve_model(server, "models:/mmfusion-debug@champion")
    assert f"http://***@127.0.0.1:{port}" in str(err.value) and SECRET not in str(err.value)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text


def test_redact_masks_user_info_of_every_uri_in_a_text():
    from pipelines.core.mlflow import redact

    text = f"at https://bob:{SECRET}@h.example/x and s3://KEY:{SECRET}@b/p, file:///tmp/a@b, sqlite:///x.db"
    assert redact(text) == "at https://***@h.example/x and s3://***@b/p, file:///tmp/a@b, sqlite:///x.db"
    assert redact("http://token@host:5000") == "http://***@host:5000"


def test_the_run_report_prints_the_server_without_credentials(tmp_path):
    from mmfusion.commands.run import dashboard_hints

    cfg = load_config("debug", [f"services.home={tmp_path}",
                                f"services.mlflow_tracking_uri=https://alice:{SECRET}@mlflow.example.com"])
    hints = "\n".join(dashboard_hints(cfg, {}))
    assert "open https://***@mlflow.example.com" in hints and SECRET not in hints
