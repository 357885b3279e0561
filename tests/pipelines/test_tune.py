"""`mmfusion tune`: the search-space parser, and one real search (local Ray, MLflow on SQLite).

The search is tiny on purpose: the debug model on the session's `tiny_dataset`, one Ray Train
worker per trial, 6 pretraining + 2 fine-tuning steps with a validation point every 3. Two trials
run one after the other (a grid, so the order is known): a sane learning rate, then lr=0, which
learns nothing, so ASHA must stop it at the first rung.
"""

from __future__ import annotations

import re

import pytest
import yaml

from pipelines.config import ConfigError, load_config
from pipelines.tune.space import (
    apply_values,
    check_space,
    default_space,
    load_space_file,
    parse_search_args,
)

pytestmark = pytest.mark.timeout(900)


# ----------------------------------------------------------------------------- the space


def test_search_args_parse_into_tune_domains():
    dims = parse_search_args(["train.lr=loguniform(1e-4, 1e-2)", "train.warmup_steps=randint(0,4)",
                              "model.fusion=choice(gated, concat)", "train.itm_weight=grid(1, 2.5)"])
    assert [(d.key, d.kind, d.args) for d in dims] == [
        ("train.lr", "loguniform", (1e-4, 1e-2)),  # YAML 1.1 would read 1e-4 as a string
        ("train.warmup_steps", "randint", (0, 4)),
        ("model.fusion", "choice", ("gated", "concat")),
        ("train.itm_weight", "grid", (1, 2.5)),
    ]
    domains = {d.key: d.to_tune() for d in dims}
    assert (domains["train.warmup_steps"].lower, domains["train.warmup_steps"].upper) == (0, 5)  # 4 included
    assert domains["model.fusion"].categories == ["gated", "concat"]
    assert domains["train.itm_weight"] == {"grid_search": [1, 2.5]}
    check_space(load_config("debug"), dims)


def test_space_file_nested_or_dotted_and_default_space_are_valid(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("train:\n  lr: loguniform(1e-4, 1e-2)\n  lm_weight: [0.5, 1, 2]\n"
                    "model.overrides.fusion.num_layers: choice(1, 2)\n")
    dims = load_space_file(path)
    assert {d.key: d.kind for d in dims} == {"train.lr": "loguniform", "train.lm_weight": "choice",
                                             "model.overrides.fusion.num_layers": "choice"}
    cfg = load_config("debug")
    check_space(cfg, dims)
    check_space(cfg, default_space(cfg))
    applied = apply_values(cfg.to_dict(), {"model.overrides.fusion.num_layers": 2, "train.lr": 0.01})
    assert applied.model.overrides == {"fusion.num_layers": 2} and applied.train.lr == 0.01


@pytest.mark.parametrize("search, message", [
    ("train.lrr=loguniform(1e-4,1e-2)", r"unknown config key 'train.lrr'.*did you mean train.lr\?"),
    ("tran.lr=choice(1)", r"the config has no 'tran'; did you mean train\?"),
    ("train.lr.x=choice(1)", r"train.lr is a value, not a section"),
    ("train=choice(1)", r"'train' is a whole section"),
    ("train.steps=choice(10,20)", r"train.steps cannot be searched.*--set"),
    ("scaling.num_workers=choice(1,2)", r"scaling.num_workers cannot be searched"),
    ("train.lr=normal(0,1)", r"cannot read 'normal\(0,1\)'.*loguniform\(lo,hi\)"),
    ("train.lr=loguniform(0,1)", r"needs lo > 0.*uniform\(0, hi\)"),
    ("train.lr=uniform(2,1)", r"needs two numbers lo < hi"),
    ("train.warmup_steps=randint(0,2.5)", r"integer bounds"),
    ("train.batch_size=choice(8,eight)", r"train.batch_size='eight' \(from choice\(8, eight\)\) is not a valid value"),
    ("model.overrides.fusion.num_layerz=choice(1)", r"unknown model override 'fusion.num_layerz'"),
    ("train.lr", r"expected dotted.key=distribution"),
])
def test_bad_search_names_the_input_and_the_fix(search, message):
    with pytest.raises(ConfigError, match=message):
        check_space(load_config("debug"), parse_search_args([search]))


def test_bad_space_file_and_duplicate_keys(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_space_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- train.lr\n")
    with pytest.raises(ConfigError, match="top level must map keys"):
        load_space_file(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="searched twice"):
        check_space(load_config("debug"), parse_search_args(["train.lr=choice(1)", "train.lr=choice(2)"]))


def test_bad_metric_and_budget_fail_before_ray(tmp_path):
    from mmfusion.cli import main

    base = ["tune", "--config", "debug", "--set", f"services.home={tmp_path}"]
    assert main([*base, "--metric", "val_accuracy"]) == 2
    assert main([*base, "--samples", "0"]) == 2
    assert not (tmp_path / "tune").exists()  # nothing started



def test_validation_losses_of_every_task_are_known_metrics():
    """Training logs `val_<task>_loss` for each task it trains, the audio tasks too."""
    from pipelines.tune.search import known_metrics

    assert {"val_pretrain_loss", "val_vqa_loss", "val_asr_loss", "val_audio_retrieval_loss"} <= set(known_metrics())
    assert "val_finetune_loss" not in known_metrics()  # `finetune` names a mix of tasks, not a loss

# ----------------------------------------------------------------------------- one real search


SETTINGS = ["scaling.num_workers=1", "train.steps=6", "train.finetune_steps=2", "train.eval_every=3",
            "train.log_every=3", "train.warmup_steps=1", "train.checkpoint_every=0", "train.batch_size=8",
            "train.val_max_samples=16", "eval.batch_size=16", "eval.max_len=8"]


@pytest.fixture(scope="module")
def search(ray_local, tiny_dataset, tmp_path_factory):
    """`mmfusion tune` in-process: lr 0.003 then lr 0, both with a 2-layer fusion; ASHA on the
    validation pretraining loss. Returns (home, printed stdout, best.yaml path, exit code)."""
    import contextlib
    import io
    import sys

    from mmfusion.cli import main

    class Tee(io.StringIO):  # keep the search's progress in pytest's report too
        def write(self, text):
            sys.__stdout__.write(text)
            return super().write(text)

    home = tmp_path_factory.mktemp("tune-home")
    out = home / "best.yaml"
    args = ["tune", "--config", "debug", *[a for s in SETTINGS for a in ("--set", s)],
            "--set", f"services.home={home}", "--data", str(tiny_dataset), "--name", "t",
            # Explicit: an earlier test's mlflow.set_tracking_uri leaves MLFLOW_TRACKING_URI behind.
            "--set", f"services.mlflow_tracking_uri=sqlite:///{home / 'mlflow.db'}",
            "--samples", "1", "--search", "train.lr=grid(0.003, 0)",
            "--search", "model.overrides.fusion.num_layers=grid(2)",
            "--metric", "val_pretrain_loss", "--mode", "min", "--concurrency", "1", "--out", str(out)]
    buffer = Tee()
    with contextlib.redirect_stdout(buffer):
        code = main(args)
    return home, buffer.getvalue(), out, code


def table_rows(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[1:]]


def test_asha_stops_the_trial_that_cannot_learn(search, ray_local):
    _, stdout, _, code = search
    assert code == 0, stdout[-3000:]
    rows = {r["train.lr"]: r for r in table_rows(stdout)}
    assert set(rows) == {"0.003", "0"}  # two trials, with different values
    good, bad = rows["0.003"], rows["0"]
    # 6 steps / 3 -> 2 pretraining points, 1 fine-tuning point, the final score: 4 reports.
    assert good["status"] == "done" and good["reports"] == "4/4" and good["trial"].endswith("(best)")
    assert bad["status"] == "stopped" and bad["reports"] == "1/4"  # stopped at the first rung
    assert float(good["val_pretrain_loss"]) < float(bad["val_pretrain_loss"])
    assert 0.0 <= float(good["val_vqa_acc"]) <= 1.0 and bad["val_vqa_acc"] == "-"
    # Nothing left holding CPUs: the stopped trial's Ray Train workers are gone too. Ray frees an
    # ended actor's or placement group's CPUs asynchronously (seconds), so allow a minute; a leak
    # (the trial's workers kept until the search ends, or forever) still fails.
    assert cpus_back(ray_local, 2.0, within_s=60) == pytest.approx(2.0)


def cpus_back(ray, total: float, within_s: float) -> float:
    import time

    deadline = time.monotonic() + within_s
    while (free := ray.available_resources().get("CPU", 0.0)) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    return free


def test_best_config_yaml_loads_and_carries_the_winner(search):
    home, stdout, out, _ = search
    text = out.read_text()
    assert text in stdout  # printed and written: the same YAML
    cfg = load_config(out)
    assert cfg.train.lr == 0.003 and cfg.model.overrides == {"fusion.num_layers": 2}
    base = load_config("debug", [*SETTINGS, f"services.home={home}"])
    assert cfg.train.steps == base.train.steps == 6 and cfg.scaling.num_workers == 1
    assert re.search(r"# val_pretrain_loss = [\d.]+ \(min\)", text)
    assert yaml.safe_load(text)["train"]["lr"] == 0.003


def test_each_trial_is_an_mlflow_run_with_its_values_and_metrics(search):
    from mlflow.tracking import MlflowClient

    home, _, _, _ = search
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mmfusion-tune")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "t")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_lr = {r.data.params["train.lr"]: r for r in trials}
    assert set(by_lr) == {"0.003", "0"}
    assert all(r.data.params["model.overrides.fusion.num_layers"] == "2" for r in trials)
    good, bad = by_lr["0.003"], by_lr["0"]
    assert good.data.tags["tune.status"] == "done" and bad.data.tags["tune.status"] == "stopped"
    assert good.info.status == bad.info.status == "FINISHED"
    history = client.get_metric_history(good.info.run_id, "val_pretrain_loss")
    assert sorted(m.step for m in history) == [1, 2]  # the two pretraining validation points
    assert {"val_vqa_acc", "val_itm_acc", "val_i2t_r1", "val_bleu4"} <= set(good.data.metrics)
    assert parent.data.tags["tune.best_trial"] == good.data.tags["tune.trial_id"]
    assert parent.info.status == "FINISHED"
    # The trials' own Ray Train runs log beside them, named after the search and the trial.
    names = {r.info.run_name for r in runs}
    assert f"t-{good.data.tags['tune.trial_id']}-finetune" in names
