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
    overrides = [f"services.home={tmp_path / 'home'}", "data.synth_num=260"]
    state = retrain(config="debug", overrides=overrides, return_state=True)
    summary = state.result()

    # the dataset version follows the contract
    data_dir = Path(summary["data_dir"])
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert all(manifest["splits"][s] for s in ("train", "val", "test"))
    assert str(tmp_path) in str(data_dir)

    # both checkpoints are real mmcore checkpoints
    for key in ("pretrain_checkpoint", "checkpoint"):
        ckpt = Path(summary[key])
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()

    # ITM was calibrated on the validation split (260 scenes: over calibrate.MIN_PAIRS pairs), into
    # the checkpoint evaluated and registered
    calibration = summary["itm_calibration"]
    config = json.loads((Path(summary["checkpoint"]) / "config.json").read_text())
    assert calibration["val_pairs"] >= 20 and config["model"]["itm_calibration"] is True
    assert config["extra"]["itm_calibration"] == calibration

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
    assert f"ITM         calibrated on {calibration['val_pairs']} validation pairs" in text

    # attention pictures of the shown test examples: on disk, in the MLflow run, in the Prefect report
    from flows.retrain import render_markdown

    pictures = summary["report"]["explanations"]
    assert len(pictures) == len(summary["report"]["examples"]) > 0
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    logged = client.list_artifacts(champion.run_id, "eval/attention")
    assert sorted(Path(a.path).name for a in logged) == sorted(Path(p).name for p in pictures)
    markdown = render_markdown(summary)
    assert markdown.count("data:image/png;base64,") == len(pictures) + len(summary["figures"])

    # dashboards: the flow run's artifacts, the figures and curves on the MLflow run, the description
    check_dashboards(client, cfg, summary, champion, state.state_details.flow_run_id)
    check_progress_logged(state.state_details.flow_run_id, cfg.train.steps)

    # new data + train.init_from=champion: a new dataset version and a fine-tune of the champion
    overrides2 = [*overrides, "data.synth_seed=1", "train.init_from=champion"]
    second = retrain(config="debug", overrides=overrides2)
    assert second["data_dir"] != summary["data_dir"] and not second["dataset_reused"]
    assert second["pretrain_checkpoint"] is None  # no pretraining
    champion_dir = Path(cfg.services.home) / "models" / cfg.registry.model_name / str(reg["version"])
    assert second["init_from"] == str(champion_dir.resolve())
    tags = client.get_model_version(cfg.registry.model_name, second["registration"]["version"]).tags
    assert tags["parent_checkpoint"] == second["init_from"]
    assert tags["dataset_version"] == Path(second["data_dir"]).name

    # the same again: nothing changed since that version was trained, so nothing trains
    third = retrain(config="debug", overrides=overrides2)
    assert third["dataset_reused"] and third["data_dir"] == second["data_dir"]
    assert f"v{second['registration']['version']}" in third["skipped"] and "training skipped" in third["skipped"]


def check_dashboards(client, cfg, summary, champion, flow_run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    assert sorted(summary["figures"]) == ["examples", "learning_curves"]
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    artifacts = {a.key: a for a in found}
    report = artifacts["retrain-report"].data
    for section in ("## Data quality", "## Report card", "## Gate: promote", "## Learning curves",
                    "## Test images: generated and true captions"):
        assert section in report, section
    assert report.count("data:image/png;base64,") == 2 + len(summary["report"]["explanations"])
    rows = artifacts["data-quality"].data
    assert "kept" in rows and str(summary["data_report"]["kept"]) in rows

    figures = sorted(a.path for a in client.list_artifacts(champion.run_id, "figures"))
    assert figures == ["figures/examples.png", "figures/learning_curves.png"]
    logged = client.get_run(champion.run_id).data.metrics
    for stage in ("pretrain", "finetune"):  # e.g. pretrain/pretrain_loss, finetune/caption_loss
        losses = [k for k in logged if k.startswith(f"{stage}/") and k.endswith("_loss") and "/val_" not in k]
        assert losses and all(len(client.get_metric_history(champion.run_id, k)) > 1 for k in losses), stage
    description = client.get_model_version(cfg.registry.model_name, champion.version).description
    assert description.startswith("**Champion**") and summary["data_report"]["version"] in description
    assert client.get_experiment_by_name(cfg.registry.experiment).tags["mlflow.experimentKind"] == \
        "custom_model_development"



def check_progress_logged(flow_run_id, steps: int) -> None:
    """The training progress lines of rank 0 are in the flow run's log (its page in the UI),
    attributed to the train task runs, up to the last step."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the log worker sends in batches
    logs: list = []
    with get_client(sync_client=True) as client:
        while not logs or len(logs) % 200 == 0:  # pages of the server's largest size
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=len(logs))
            logs += page
            if not page:
                break
    progress = [log for log in logs if log.message.startswith("[train] ") and " steps (" in log.message]
    assert progress and all(log.task_run_id is not None for log in progress), [log.message for log in logs]
    last = [log.message for log in progress if f"{steps}/{steps} steps (100%)" in log.message]
    assert last and "; task " in last[0] and " samples/s" in last[0], [log.message for log in progress]
