"""Evaluation on the tiny ingested dataset with a real (tiny, untrained) mmcore checkpoint."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from pipelines.config import load_config
from pipelines.core.records import ALL_METRICS, compute_metrics, read_records
from pipelines.evaluate import evaluate


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dataset, tmp_path_factory, make_untrained_checkpoint):
    torch.set_num_threads(1)
    return make_untrained_checkpoint(tiny_dataset, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.max_len=8",
                                 "eval.parallel=local", "eval.bootstrap_samples=200"])


def test_report_card_is_complete_deterministic_and_recomputable(cfg, tiny_dataset, tiny_checkpoint, tmp_path):
    from mmcore.metrics import bleu4, cider_d, vqa_accuracy

    a = evaluate(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "a")
    b = evaluate(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "b")
    assert set(a["metrics"]) == set(ALL_METRICS)
    assert a["metrics"] == b["metrics"] and a["benchmark"] == b["benchmark"]
    assert open(a["per_sample_path"]).read() == open(b["per_sample_path"]).read()
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert a["dataset_version"] == manifest["version"]
    assert re.fullmatch(re.escape(manifest["version"]) + r":test-[0-9a-f]{12}", a["benchmark"])
    records = read_records(a["per_sample_path"])
    assert len(records) == a["num_images"] > 0
    assert compute_metrics(records) == a["metrics"]
    # The file alone reproduces mmcore's corpus metrics.
    cands = {r["key"]: r["generated"] for r in records}
    refs = {r["key"]: r["references"] for r in records}
    assert a["metrics"]["bleu4"] == pytest.approx(bleu4(cands, refs))
    assert a["metrics"]["cider_d"] == pytest.approx(cider_d(cands, refs))
    qa = [q for r in records for q in r["vqa"]]
    if qa:
        assert a["metrics"]["vqa_acc"] == pytest.approx(
            vqa_accuracy({i: q["predicted"] for i, q in enumerate(qa)}, {i: q["answers"] for i, q in enumerate(qa)}))
    for m in ALL_METRICS:
        v = a["metrics"][m]
        assert v is None or (0.0 <= v <= (10.0 if m == "cider_d" else 1.0)), (m, v)
    assert len(a["examples"]) == min(cfg.eval.num_samples_shown, len(records))
    # The synthetic scenes list their objects: every caption is scored for grounding, from the file.
    from mmcore.metrics.grounding import grounding_counts, grounding_f1, question_type
    from pipelines.ingest.synth import PHRASE_VOCAB

    assert all(r["grounding"] is not None for r in records)
    assert a["metrics"]["grounding_f1"] == pytest.approx(grounding_f1(r["grounding"] for r in records))
    phrases = [grounding_counts(r["generated"], [], PHRASE_VOCAB)[1] for r in records]
    assert [r["grounding"][0] + r["grounding"][1] for r in records] == phrases  # tp + fp = phrases stated
    for kind in ("count", "colour", "size", "shape", "yesno"):
        asked = [q for q in qa if question_type(q["question"]) == kind]
        assert asked and a["metrics"][f"vqa_{kind}"] == pytest.approx(sum(q["score"] for q in asked) / len(asked))
    card = json.loads(open(a["report_card_path"]).read())
    weights = (tiny_checkpoint / "model.safetensors").read_bytes()
    assert card["weights_sha256"] == hashlib.sha256(weights).hexdigest()  # names the bytes scored
    assert card["num_images"] == len(records) and card["num_captions"] == sum(len(r["references"]) for r in records)


def test_itm_rerank_only_reorders_the_top_k(cfg, tiny_dataset, tiny_checkpoint, tmp_path):
    plain = evaluate(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "plain")["metrics"]
    cfg.eval.itm_rerank_k = 5
    reranked = evaluate(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "rr")
    r = reranked["metrics"]
    # Re-ranking permutes the top 5 only: recall at 5 and 10 cannot change.
    for m in ("i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):
        assert r[m] == pytest.approx(plain[m])
    assert reranked["settings"]["itm_rerank_k"] == 5


def test_ray_tasks_give_the_same_results(cfg, tiny_dataset, tiny_checkpoint, tmp_path, ray_local):
    local = evaluate(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "local")
    cfg.eval.parallel = "ray"
    on_ray = evaluate(cfg, tiny_checkpoint, tiny_dataset, tmp_path / "ray")
    a, b = read_records(local["per_sample_path"]), read_records(on_ray["per_sample_path"])
    assert [r["key"] for r in a] == [r["key"] for r in b]
    assert [r["generated"] for r in a] == [r["generated"] for r in b]
    for m, v in local["metrics"].items():
        assert on_ray["metrics"][m] == pytest.approx(v, abs=1e-6), m


def test_evaluate_on_real_coco_photos(coco_mini, ray_local, tmp_path, cfg, make_untrained_checkpoint):
    """Real photos with 5 human captions each: every caption counts for text->image retrieval."""
    from pipelines.ingest import ingest

    data_cfg = load_config("debug", ["data.split_fractions={train: 0.4, val: 0.1, test: 0.5}"]).data
    vdir = ingest(coco_mini, tmp_path / "datasets", data_cfg)
    ckpt = make_untrained_checkpoint(vdir, tmp_path / "ckpt")
    report = evaluate(cfg, ckpt, vdir, tmp_path / "eval")
    records = read_records(report["per_sample_path"])
    assert report["num_images"] == len(records) > 20
    assert report["num_captions"] >= 5 * len(records) - 5  # COCO: 5 (rarely 6) captions per photo
    assert all(len(r["references"]) >= 5 for r in records)
    assert report["metrics"]["vqa_acc"] is None  # captions only: no VQA pairs to score
    assert 0.0 <= report["metrics"]["t2i_r10"] <= 1.0
    assert evaluate(cfg, ckpt, vdir, tmp_path / "eval2")["metrics"] == report["metrics"]
