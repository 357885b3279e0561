"""What the retrain flow asks the registry (MLflow on SQLite in a temporary directory): skip
training when nothing changed since the champion, the champion's weights to fine-tune from, and
the description written on a registered version."""

from __future__ import annotations

import shutil

import pytest
from registry_support import hits, make_checkpoint, make_report

from pipelines.config import load_config
from pipelines.registry import lineage as lineage_mod
from pipelines.registry import register_and_gate


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.bootstrap_samples=300"])


def _lineage(cfg, dataset="dsv1", code=None):
    return {"dataset_version": dataset, "config_hash": cfg.hash(), "code_version": "deadbeef",
            "code_hash": code or lineage_mod.code_hash(), "parent_checkpoint": "/ckpt/pretrain"}


def test_training_is_skipped_only_when_data_config_and_code_all_match(cfg, tmp_path):
    code = lineage_mod.code_hash()
    assert lineage_mod.unchanged_since_champion(cfg, "dsv1", cfg.hash(), code) is None  # no champion yet
    reg = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30)), _lineage(cfg))
    assert reg["promoted"]

    reason = lineage_mod.unchanged_since_champion(cfg, "dsv1", cfg.hash(), code)
    assert reason is not None
    assert f"v{reg['version']}" in reason and "dsv1" in reason and cfg.hash() in reason and "skipped" in reason
    assert lineage_mod.unchanged_since_champion(cfg, "dsv2", cfg.hash(), code) is None  # new data
    assert lineage_mod.unchanged_since_champion(cfg, "dsv1", "othercfg", code) is None  # new config
    assert lineage_mod.unchanged_since_champion(cfg, "dsv1", cfg.hash(), "othercode") is None  # new code

    # a challenger the gate kept out: training it again on the same inputs would change nothing
    worse = register_and_gate(cfg, make_checkpoint(tmp_path, 2), make_report(tmp_path, hits(20), tag="w"),
                              _lineage(cfg, dataset="dsv2"))
    assert not worse["promoted"]
    again = lineage_mod.unchanged_since_champion(cfg, "dsv2", cfg.hash(), code)
    assert again is not None and f"v{worse['version']} was already trained on dataset version dsv2" in again
    assert "not promoted" in again and "skipped" in again
    assert lineage_mod.unchanged_since_champion(cfg, "dsv2", cfg.hash(), "othercode") is None


def test_code_hash_follows_the_source_files(tmp_path, monkeypatch):
    for package in lineage_mod.CODE_PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(lineage_mod, "ROOT", tmp_path)
    compute = lineage_mod.code_hash.__wrapped__
    first = compute()
    assert compute() == first
    (tmp_path / "pipelines" / "a.py").write_text("x = 2\n")
    assert compute() != first
    (tmp_path / "pipelines" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs do not make a model\n")
    assert compute() == first


def test_champion_checkpoint_is_the_registered_weights(cfg, tmp_path):
    assert lineage_mod.champion_checkpoint(cfg) is None
    ckpt = make_checkpoint(tmp_path, 7)
    reg = register_and_gate(cfg, ckpt, make_report(tmp_path, hits(40)), _lineage(cfg))
    uri, local = lineage_mod.champion_checkpoint(cfg)
    assert uri == f"models:/{cfg.registry.model_name}/{reg['version']}"
    assert (local / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    shutil.rmtree(ckpt)  # the local copy does not depend on the original
    assert (local / "config.json").is_file()


def test_the_registered_version_carries_a_readable_description(cfg, tmp_path):
    from mlflow import MlflowClient

    from pipelines.config import mlflow_tracking_uri

    register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30), tag="a"), _lineage(cfg))
    report = make_report(tmp_path, hits(60), tag="b")
    reg = register_and_gate(cfg, make_checkpoint(tmp_path, 2), report, _lineage(cfg))
    data_report = {"version": "dsv1", "kept": 180, "rejected": {"too_small": 15, "bad_caption": 5}, "duplicates": 3}
    lineage_mod.describe_version(cfg, reg, report, _lineage(cfg), data_report)

    text = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg)).get_model_version(
        cfg.registry.model_name, reg["version"]).description
    assert text.startswith("**Champion**") and f"v{reg['version']} vs champion v1" in text
    assert "| i2t_r1 | 0.6000 |" in text
    assert "| kept | 180 |" in text and "| rejected | 20 |" in text and "| duplicates | 3 |" in text
    assert "| dataset_version | dsv1 |" in text and f"| config_hash | {cfg.hash()} |" in text
    assert "Gate on i2t_r1: delta +0.3000, lower bound +" in text
