"""On a fresh home, every MLflow artifact of a train -> evaluate -> register run lives under the
configured store, none in Ray's session folder (which Ray deletes), and the champion downloads.

Real local Ray Train (one worker, a few steps), real evaluation, MLflow on SQLite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import load_config, mlflow_tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # one tiny Ray Train run (~1 min)


def ray_session_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()).resolve()


def test_a_fresh_home_keeps_every_artifact_in_the_configured_store(ray_local, tiny_dataset, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.evaluate import evaluate
    from pipelines.registry import register_and_gate, resolve_model
    from pipelines.train import run_training

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    cfg = load_config("debug", [
        f"services.home={home}", "train.steps=2", "train.checkpoint_every=2", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=0", "train.warmup_steps=1", "train.loader_workers=1",
        "train.val_max_samples=8", "scaling.num_workers=1", "eval.max_len=4", "eval.parallel=local",
        "eval.bootstrap_samples=50",
    ])
    ckpt = run_training(cfg, tiny_dataset, "pretrain", run_name="fresh")
    report = evaluate(cfg, ckpt, tiny_dataset)
    reg = register_and_gate(cfg, ckpt, report, {"dataset_version": report["dataset_version"]})
    assert reg["promoted"]

    uri = mlflow_tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    store = (home / "mlartifacts" / cfg.registry.experiment).as_uri()
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    assert exp.artifact_location == store
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.run_name for r in runs} >= {"fresh"}  # the training run (from a Ray worker) too
    assert all(r.info.artifact_uri.startswith(store + "/") for r in runs)
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert champion.source.startswith(store + "/")

    session = ray_session_dir()
    assert not list(session.rglob("mlruns"))  # nothing was written into Ray's session folder
    assert str(session) not in champion.source and str(session) not in exp.artifact_location

    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=champion.source, dst_path=str(tmp_path / "dl")))
    assert (got / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    served = resolve_model(cfg, f"models:/{cfg.registry.model_name}@champion")  # what serving loads
    assert (served / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert not (tmp_path / "mlruns").exists()
