"""ITM calibration after fine-tuning: the fit, and writing it into a real checkpoint read back by
evaluation, on the tiny ingested dataset's validation split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mmcore.checkpoint import CheckpointError, load_checkpoint
from pipelines.config import load_config
from pipelines.evaluate import calibrate as calib
from pipelines.evaluate.calibrate import calibrate_itm, fit_logistic, pair_accuracy, pair_features


def test_the_fit_finds_the_informative_feature_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) < 0.5).float()
    noise = torch.randn(400, generator=g) * 3.0 + 5.0  # uninformative, large and off-centre
    signal = (2 * y - 1) * 0.8 + torch.randn(400, generator=g) * 0.5 - 4.0  # informative, offset
    x = torch.stack([noise, signal, torch.randn(400, generator=g)], dim=1)
    w = fit_logistic(x, y)
    assert w.shape == (4,) and torch.isfinite(w).all()
    assert w[1] > 5 * max(abs(w[0]), abs(w[2]))  # the weight is on the signal
    assert pair_accuracy(x @ w[:3] + w[3], y) > 0.85 > pair_accuracy(x[:, 0] - x[:, 0].mean(), y)
    assert torch.equal(w, fit_logistic(x, y))
    # Separable data: the penalty keeps the weights finite and moderate.
    sep = torch.stack([(2 * y - 1) * 10, torch.zeros(400), torch.zeros(400)], dim=1)
    w = fit_logistic(sep, y)
    assert torch.isfinite(w).all() and w.abs().max() < 50 and pair_accuracy(sep @ w[:3] + w[3], y) == 1.0


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.max_len=6", "eval.parallel=local"])


@pytest.fixture
def checkpoint(tiny_dataset, tmp_path_factory, make_untrained_checkpoint):
    torch.set_num_threads(1)
    return make_untrained_checkpoint(tiny_dataset, tmp_path_factory.mktemp("ckpt") / "model")


def _val_pairs(cfg, checkpoint, tiny_dataset):
    from pipelines.core.dataset import shard_paths
    from pipelines.evaluate.inference import infer_shards, merge, settings_for

    merged = merge(infer_shards(str(checkpoint), shard_paths(tiny_dataset, "val"), settings_for(cfg, checkpoint), False))
    model, _, _ = load_checkpoint(checkpoint)
    return model, merged


def test_calibration_is_written_into_the_checkpoint_and_scores_the_pairs(cfg, tiny_dataset, checkpoint, monkeypatch):
    monkeypatch.setattr(calib, "MIN_PAIRS", 4)  # the tiny set's validation split is small
    before = (checkpoint / "model.safetensors").read_bytes()
    result = calibrate_itm(cfg, checkpoint, tiny_dataset)
    assert "skipped" not in result and result["val_pairs"] >= 4
    assert result["val_acc_calibrated"] >= result["val_acc_head"]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model"]["itm_calibration"] is True and config["extra"]["itm_calibration"] == result
    model, merged = _val_pairs(cfg, checkpoint, tiny_dataset)
    w = model.heads.itm_calibration
    assert w.tolist() == pytest.approx(result["weights"], abs=1e-6)
    # The loaded model scores with those weights: its ITM logits are the features' weighted sum,
    # and they give the validation accuracy the step reported.
    x, y = pair_features(model, merged, 16)
    from pipelines.evaluate.ranking import itm_logits

    pairs = itm_logits(model, merged, 16)
    scores = torch.tensor([p[0] for p in pairs.values()] + [p[1] for p in pairs.values()])
    assert torch.allclose(scores, x @ w[:3] + w[3], atol=1e-4)
    assert pair_accuracy(scores, y) == pytest.approx(result["val_acc_calibrated"])
    # Again: fitted from the head's own logits, so the same weights; everything else unchanged.
    assert calibrate_itm(cfg, checkpoint, tiny_dataset)["weights"] == result["weights"]
    from safetensors.torch import load

    old, new = load(before), load((checkpoint / "model.safetensors").read_bytes())
    assert set(new) - set(old) == {"heads.itm_calibration"} and all(torch.equal(old[k], new[k]) for k in old)


def test_an_interrupted_calibration_is_repaired_and_too_few_pairs_skip(cfg, tiny_dataset, checkpoint, monkeypatch):
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint / "model.safetensors"))
    state["heads.itm_calibration"] = torch.tensor([9.0, 9.0, 9.0, 9.0])
    save_file(state, str(checkpoint / "model.safetensors"), metadata={"format": "mmcore"})
    with pytest.raises(CheckpointError, match="itm_calibration"):  # weights written, config not
        load_checkpoint(checkpoint)
    monkeypatch.setattr(calib, "MIN_PAIRS", 10_000)
    result = calibrate_itm(cfg, checkpoint, tiny_dataset)
    assert "fewer than 10000" in result["skipped"]
    model, _, _ = load_checkpoint(checkpoint)  # loadable again, as the head alone
    assert model.heads.itm_calibration.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_cli_calibrates_a_checkpoint_and_names_a_bad_one(cfg, tiny_dataset, checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    run = [sys.executable, "-m", "mmfusion.cli", "train", "calibrate", "--config", "debug",
           "--set", f"services.home={tmp_path / 'home'}", "--set", "eval.parallel=local", "--data", str(tiny_dataset)]
    bad = subprocess.run([*run, "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a checkpoint directory" in bad.stderr
    ok = subprocess.run([*run, "--model", str(copy)], capture_output=True, text=True, timeout=300)
    config = json.loads((copy / "config.json").read_text())
    # The tiny split has fewer pairs than calibration needs: said, and the checkpoint left as it was
    # (the success path is the in-process test above, with the minimum lowered).
    val = json.loads((tiny_dataset / "manifest.json").read_text())["splits"]["val"]
    assert sum(e["samples"] for e in val) < calib.MIN_PAIRS
    assert ok.returncode == 1 and "fewer than" in ok.stderr, ok.stderr
    assert not config["model"].get("itm_calibration")


def test_training_from_a_calibrated_checkpoint_starts_from_the_head_alone(cfg, tiny_dataset, checkpoint, tmp_path):
    # Fine-tuning a calibrated champion moves its head: the old weights must not score the new one
    # (with calibrate_itm off, or too few validation pairs to fit again).
    from types import SimpleNamespace

    from pipelines.evaluate.calibrate import write_calibration
    from pipelines.train.resume import initial_model

    copy = tmp_path / "champion"
    shutil.copytree(checkpoint, copy)
    write_calibration(copy, torch.tensor([0.5, 2.0, 1.0, -0.25]), {"weights": [0.5, 2.0, 1.0, -0.25]})
    champion, _, _ = load_checkpoint(copy)
    assert champion.heads.itm_calibration.tolist() == [0.5, 2.0, 1.0, -0.25]
    model = initial_model(SimpleNamespace(run=SimpleNamespace(init_from=str(copy))), None).eval()
    assert model.heads.itm_calibration.tolist() == [1.0, 0.0, 0.0, 0.0]
    # Scored with the head alone, and equal to the champion's uncalibrated logits.
    _, merged = _val_pairs(cfg, copy, tiny_dataset)
    x, _ = pair_features(champion, merged, 16)
    from pipelines.evaluate.ranking import itm_logits

    pairs = itm_logits(model, merged, 16)
    scores = torch.tensor([p[0] for p in pairs.values()] + [p[1] for p in pairs.values()])
    assert torch.allclose(scores, x[:, 0], atol=1e-4)
    assert not torch.allclose(scores, x @ champion.heads.itm_calibration[:3] + champion.heads.itm_calibration[3], atol=1e-2)
