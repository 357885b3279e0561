"""The retrain dashboards without training: learning curves drawn from a checkpoint's history,
the data-quality and gate sections, and the figures and per-step curves on a real MLflow run
(SQLite in a temporary directory)."""

from __future__ import annotations

import json

import pytest

from flows.dashboard import data_quality_markdown, gate_markdown, log_to_mlflow, render_markdown
from pipelines.config import load_config, mlflow_tracking_uri
from pipelines.evaluate.report import curve_series, learning_curves, read_history

HISTORY = [{"step": s, "loss": 5.0 / s, "itc_loss": 3.0 / s, "samples_per_s": 90.0, "lr": 1e-3, "grad_norm": 2.0,
            **({"val_loss": 4.0 / s, "val_i2t_r1": s / 40} if s % 10 == 0 else {})} for s in (5, 10, 15, 20)]


def _checkpoint(tmp_path, history):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 20, "history": history}))
    return ckpt


def test_history_becomes_loss_and_validation_series(tmp_path):
    history = read_history(_checkpoint(tmp_path, HISTORY))
    series = curve_series(history)
    assert sorted(series) == ["itc_loss", "loss", "val_i2t_r1", "val_loss"]  # not speed, lr, grad norm, step
    assert series["loss"] == ([5, 10, 15, 20], [1.0, 0.5, 5 / 15, 0.25])
    assert series["val_i2t_r1"] == ([10, 20], [0.25, 0.5])
    assert read_history(tmp_path / "no-checkpoint") == []


def test_learning_curves_have_a_row_per_stage_with_train_and_val_panels():
    fig = learning_curves({"pretrain": HISTORY, "finetune": HISTORY[:2], "empty": []})
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["pretrain: training loss", "pretrain: validation",
                                               "finetune: training loss", "finetune: validation"]
    assert sorted(line.get_label() for line in axes[0].get_lines()) == ["itc_loss", "loss"]
    assert sorted(line.get_label() for line in axes[1].get_lines()) == ["val_i2t_r1", "val_loss"]
    with pytest.raises(ValueError, match="no training history"):
        learning_curves({"pretrain": []})


def test_data_quality_and_gate_sections():
    dq = data_quality_markdown({"version": "v1", "seen": 220, "kept": 200, "rejected": {"too_small": 12},
                                "dedup": {"exact": 8, "near": 0, "distance": 4},
                                "per_split": {"train": {"samples": 160}}})
    for row in ("| seen | 220 |", "| kept | 200 |", "| rejected: too_small | 12 |", "| duplicates: exact | 8 |",
                "| split train | 160 |"):
        assert row in dq
    assert "distance" not in dq
    gate = gate_markdown({"promote": True, "reason": "better", "metric": "i2t_r1", "challenger": 0.5,
                          "champion": 0.3, "delta": 0.2, "ci_low": 0.12, "p_value": 0.001, "confidence": 0.95})
    assert "## Gate: promote" in gate and "lower bound (95%)" in gate
    assert "| i2t_r1 | 0.5000 | 0.3000 | +0.2000 | +0.1200 | 0.0010 |" in gate
    assert "lower bound" not in gate_markdown({"promote": True, "reason": "no champion yet"})


def test_report_embeds_the_figures(tmp_path):
    from pipelines.evaluate.report import _pyplot

    png = tmp_path / "curves.png"
    fig = learning_curves({"pretrain": HISTORY})
    fig.savefig(png, format="png")
    _pyplot().close(fig)
    summary = {"data_dir": "/d", "checkpoint": "/c", "dataset_reused": True, "figures": {"learning_curves": str(png)},
               "data_report": {"version": "v1", "kept": 3}, "registration": {
                   "name": "m", "version": "2", "promoted": False, "reason": "worse",
                   "decision": {"promote": False, "reason": "worse", "metric": "i2t_r1", "delta": -0.1, "ci_low": -0.2,
                                "confidence": 0.95}},
               "report": {"metrics": {"i2t_r1": 0.4}, "examples": []}}
    markdown = render_markdown(summary)
    assert markdown.count("data:image/png;base64,") == 1 and "## Learning curves" in markdown
    assert "(reused: unchanged)" in markdown and "## Data quality (v1)" in markdown
    assert "## Gate: keep the champion" in markdown and "| i2t_r1 | 0.4000 |" in markdown


def test_figures_and_per_step_curves_land_on_the_mlflow_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.core.mlflow import client, experiment_id

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}"])
    ml = client(cfg)
    run_id = ml.create_run(experiment_id(cfg, ml)).info.run_id
    log_to_mlflow(cfg, run_id, {"learning_curves": learning_curves({"pretrain": HISTORY})},
                  {"pretrain": HISTORY, "finetune": HISTORY[:2]})

    reader = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    assert [a.path for a in reader.list_artifacts(run_id, "figures")] == ["figures/learning_curves.png"]
    local = reader.download_artifacts(run_id, "figures/learning_curves.png", str(tmp_path))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    loss = reader.get_metric_history(run_id, "pretrain/loss")
    assert sorted((m.step, m.value) for m in loss) == [(5, 1.0), (10, 0.5), (15, 5 / 15), (20, 0.25)]
    assert [m.step for m in reader.get_metric_history(run_id, "finetune/val_loss")] == [10]


def test_the_printed_report_of_a_skipped_run_says_why():
    from mmfusion.commands.run import format_report

    text = format_report(load_config("debug"), {"data_dir": "/d/v1", "dataset_reused": True,
                                                "skipped": "nothing changed since champion m v3 was trained"})
    assert "nothing trained" in text and "/d/v1 (reused: unchanged)" in text
    assert "skipped     nothing changed since champion m v3 was trained" in text

