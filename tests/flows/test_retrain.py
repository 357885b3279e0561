"""End to end: the `retrain` flow on the debug preset, with real local Ray, Prefect's test harness
and MLflow on SQLite in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture()
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_retrain_registers_a_champion(tmp_path, monkeypatch, ray_local, prefect_harness):
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from mmfusion.commands.run import format_report
    from pipelines.config import load_config, mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"services.home={tmp_path / 'home'}", "data.synth_num=200"]
    summary = retrain(config="debug", overrides=overrides)

    # the dataset version follows the contract
    data_dir = Path(summary["data_dir"])
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert all(manifest["splits"][s] for s in ("train", "val", "test"))
    assert str(tmp_path) in str(data_dir)

    # both checkpoints are real mmcore checkpoints
    for key in ("pretrain_checkpoint", "checkpoint"):
        ckpt = Path(summary[key])
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()

    # a version was registered with metrics, and champion points at it (first model ever)
    cfg = load_config("debug", overrides)
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    reg = summary["registration"]
    assert reg["promoted"] is True
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == str(reg["version"])
    run = client.get_run(champion.run_id)
    for metric in ("i2t_r1", "t2i_r1", "bleu4", "cider_d", "vqa_acc"):
        assert metric in run.data.metrics, f"{metric} missing from the registered run"
    assert champion.tags["dataset_version"] == data_dir.name
    assert champion.tags["config_hash"] == cfg.hash()

    # the printed report says where things are and shows generated captions
    text = format_report(cfg, summary)
    assert str(data_dir) in text and "model:" in text and "mlflow ui" in text

    # attention pictures of the shown test examples: on disk, in the MLflow run, in the Prefect report
    from flows.retrain import render_markdown

    pictures = summary["report"]["explanations"]
    assert len(pictures) == len(summary["report"]["examples"]) > 0
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    logged = client.list_artifacts(champion.run_id, "eval/attention")
    assert sorted(Path(a.path).name for a in logged) == sorted(Path(p).name for p in pictures)
    markdown = render_markdown(summary)
    assert markdown.count("data:image/png;base64,") == len(pictures)
