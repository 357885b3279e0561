"""The MLflow registry on a real SQLite store in a temporary directory (and once via a real server).

Checkpoints here are plain files (a safetensors blob, config, tokenizer, training state): the
registry moves files and metadata, it never needs to load a model. Per-sample results are
synthetic so the gate's outcome is known in advance.
"""

from __future__ import annotations

import threading
import time

import pytest
from registry_support import LINEAGE, hits, make_checkpoint, make_report

from pipelines.config import load_config
from pipelines.core.model_uri import ModelURIError
from pipelines.registry import list_models, register_and_gate, resolve_model, rollback, show
from pipelines.registry import register as register_mod

safetensors_torch = pytest.importorskip("safetensors.torch")
torch = pytest.importorskip("torch")


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything MLflow wrote to ./mlruns would show up here
    return load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.bootstrap_samples=300"])


def test_gate_sequence_tags_and_rollback(cfg, tmp_path):
    a = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30), tag="a"), LINEAGE)
    assert a["promoted"] and a["champion_version"] == a["version"] and "no champion" in a["reason"]
    worse = register_and_gate(cfg, make_checkpoint(tmp_path, 2), make_report(tmp_path, hits(25), tag="b"), LINEAGE)
    assert not worse["promoted"] and worse["champion_version"] == a["version"]
    better = register_and_gate(cfg, make_checkpoint(tmp_path, 3), make_report(tmp_path, hits(50), tag="c"), LINEAGE)
    assert better["promoted"] and better["champion_version"] == better["version"]

    info = show(cfg, f"{cfg.registry.model_name}@champion")
    assert info["version"] == better["version"] and "champion" in info["aliases"]
    tags = info["tags"]
    assert tags["dataset_version"] == "dsv1" and tags["config_hash"] == "cfg123"
    assert tags["code_version"] == "deadbeef" and tags["parent_checkpoint"] == "/ckpt/pretrain"
    assert tags["benchmark"] == "dsv1:abc" and tags["previous_champion"] == a["version"]
    assert tags["gate.promote"] == "True" and float(tags["gate.ci_low"]) > 0
    assert info["metrics"]["i2t_r1"] == pytest.approx(0.5)
    rejected = show(cfg, f"{cfg.registry.model_name}/{worse['version']}")["tags"]
    assert rejected["gate.promote"] == "False" and "margin" in rejected["gate.reason"]

    listed = list_models(cfg)
    assert [v["version"] for v in listed[0]["versions"]] == ["3", "2", "1"]
    back = rollback(cfg, cfg.registry.model_name)
    assert back["champion"] == a["version"]
    assert show(cfg, cfg.registry.model_name)["version"] == a["version"]
    with pytest.raises(ModelURIError, match="nothing to roll back"):
        rollback(cfg, cfg.registry.model_name)
    assert not (tmp_path / "mlruns").exists()


def test_different_benchmark_is_never_compared_silently(cfg, tmp_path):
    register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(10), tag="a"), LINEAGE)
    other = make_report(tmp_path, hits(90), benchmark="dsv2:fff", tag="b")
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 2), other, LINEAGE)
    assert not res["promoted"] and "not compared" in res["reason"]
    assert "dsv2:fff" in res["reason"] and "dsv1:abc" in res["reason"]


def test_champion_re_evaluated_on_new_benchmark_is_compared(cfg, tmp_path):
    """A nightly run on a new dataset version passes the champion's evaluation on its benchmark."""
    from pipelines.registry import champion_benchmark

    first = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(10), tag="a"), LINEAGE)
    assert champion_benchmark(cfg) == (first["version"], "dsv1:abc")
    champ_on_v2 = {**make_report(tmp_path, hits(20), benchmark="dsv2:fff", tag="c"), "version": first["version"]}
    better = make_report(tmp_path, hits(60), benchmark="dsv2:fff", tag="b")
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 2), better, LINEAGE, champion_report=champ_on_v2)
    assert res["promoted"] and "re-evaluated on dsv2:fff" in res["reason"]
    # a report of some other version is not taken for the champion's
    stale = {**champ_on_v2, "version": "999"}
    worse = make_report(tmp_path, hits(5), benchmark="dsv3:eee", tag="d")
    res = register_and_gate(cfg, make_checkpoint(tmp_path, 3), worse, LINEAGE, champion_report=stale)
    assert not res["promoted"] and "not compared" in res["reason"]


def test_resolve_round_trip_gives_identical_files(cfg, tmp_path):
    ckpt = make_checkpoint(tmp_path, 5)
    report = make_report(tmp_path, hits(40))
    res = register_and_gate(cfg, ckpt, report, LINEAGE)
    for uri in (f"models:/{res['name']}@champion", res["model_uri"]):
        local = resolve_model(cfg, uri)
        names = sorted(p.name for p in local.iterdir())
        assert names == ["config.json", "model.safetensors", "tokenizer.json"]  # no resume files
        for n in names:
            assert (local / n).read_bytes() == (ckpt / n).read_bytes()
    assert resolve_model(cfg, ckpt) == ckpt.resolve()
    # the version's run holds the report card a person opens in MLflow's UI, beside its metrics
    from pipelines.core.mlflow import client

    ml = client(cfg)
    run_id = ml.get_model_version(res["name"], res["version"]).run_id
    assert sorted(a.path for a in ml.list_artifacts(run_id, "eval")) == ["eval/per_sample.jsonl",
                                                                        "eval/report_card.json"]
    card = ml.download_artifacts(run_id, "eval/report_card.json", str(tmp_path / "card"))
    assert open(card).read() == open(report["report_card_path"]).read()
    with pytest.raises(ModelURIError, match="not found in the registry"):
        resolve_model(cfg, f"models:/{res['name']}@nope")
    with pytest.raises(ModelURIError, match="bad model URI"):
        resolve_model(cfg, "models:/just/too/many")


def test_racing_registrations_leave_the_best_champion(cfg, tmp_path, monkeypatch):
    """Two challengers both beat the champion; whichever order the lock grants, the best wins."""
    real_register = register_mod.register_version
    for trial, (first, second) in enumerate([(50, 80), (80, 50)]):
        cfg.registry.model_name = f"race-{trial}"
        monkeypatch.setattr(register_mod, "register_version", real_register)
        base = make_report(tmp_path, hits(20), tag=f"base{trial}")
        register_and_gate(cfg, make_checkpoint(tmp_path / f"b{trial}", 1), base, LINEAGE)
        barrier = threading.Barrier(2)
        delay = {first: 0.0, second: 0.3}

        def slow_register(cfg_, ckpt, report, lineage, barrier=barrier, delay=delay):
            mv = real_register(cfg_, ckpt, report, lineage)
            barrier.wait(timeout=60)  # both versions exist before either reaches the gate
            time.sleep(delay[int(round(report["metrics"]["i2t_r1"] * 100))])
            return mv

        monkeypatch.setattr(register_mod, "register_version", slow_register)
        results = {}

        def worker(pct, seed, trial=trial, results=results):
            report = make_report(tmp_path, hits(pct), tag=f"t{trial}-{pct}")
            results[pct] = register_and_gate(cfg, make_checkpoint(tmp_path / f"t{trial}", seed), report, LINEAGE)

        threads = [threading.Thread(target=worker, args=(p, 10 * trial + p)) for p in (first, second)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        assert set(results) == {50, 80}
        champ = show(cfg, cfg.registry.model_name)
        assert champ["version"] == results[80]["version"], (trial, results)
        assert champ["metrics"]["i2t_r1"] == pytest.approx(0.8)
