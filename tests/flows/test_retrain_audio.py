"""End to end on the spoken set: the `retrain` flow on `configs/audio.yaml` (shrunk: fewer scenes,
steps and pixels), with real local Ray, Prefect's test harness, MLflow on SQLite and espeak-ng.
The registered champion's run and report card hold the audio metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.core.records import AUDIO_METRICS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "audio.yaml"


@pytest.fixture()
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_audio_config_registers_a_champion_with_the_audio_metrics(tmp_path, monkeypatch, ray_local,
                                                                         prefect_harness):
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from pipelines.config import load_config, mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"services.home={tmp_path / 'home'}", "data.synth_num=120", "data.image_size=32",
                 "train.steps=16", "train.finetune_steps=10", "train.batch_size=8", "train.warmup_steps=2",
                 "train.checkpoint_every=0", "train.eval_every=0", "eval.max_len=12"]
    summary = retrain(config=str(CONFIG), overrides=overrides)
    cfg = load_config(str(CONFIG), overrides)
    assert cfg.registry.model_name == "mmfusion-audio" and cfg.model.audio_encoder == "debug"

    # the dataset version holds the spoken clips
    manifest = json.loads((Path(summary["data_dir"]) / "manifest.json").read_text())
    assert manifest["splits"]["test"]

    # the report card: every audio metric computed, on every test image
    card = summary["report"]
    assert all(card["metrics"][m] is not None for m in AUDIO_METRICS), card["metrics"]
    assert card["num_audio"] == card["num_images"] > 0 and card["num_spoken_questions"] > 0
    assert 0 <= card["metrics"]["a2t_r10"] <= 1 and card["metrics"]["asr_wer"] >= 0

    # the first model ever is the champion, gated on asr_wer, its run holds the audio metrics
    reg = summary["registration"]
    assert reg["promoted"] is True
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    champion = client.get_model_version_by_alias("mmfusion-audio", "champion")
    assert str(champion.version) == str(reg["version"])
    logged = client.get_run(champion.run_id).data.metrics
    missing = [m for m in AUDIO_METRICS if m not in logged]
    assert not missing, f"audio metrics missing from the registered run: {missing}"
    assert logged["asr_wer"] == pytest.approx(card["metrics"]["asr_wer"])
