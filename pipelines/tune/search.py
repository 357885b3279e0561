"""`run_search(cfg, spec)`: a Ray Tune search with ASHA over pretrain + fine-tune + validation.

The driver prepares the dataset version and its tokenizer once, then a `Tuner` runs
`pipelines.tune.trial.run_trial` per sampled config on the pipeline's Ray (local, or the cluster
named by `services.ray_address` / `RAY_ADDRESS`). Each trial reserves no CPU itself (only memory): its Ray Train
workers and scoring tasks do (`scaling`, `eval.ray_cpus_per_task`), and `max_concurrent_trials` keeps the trials within the cluster. Every
trial is an MLflow run (params: the sampled values; metrics: each validation point), nested under
one run for the search, in the experiment `<registry.experiment>-tune`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Config, ConfigError, home_dir, mlflow_tracking_uri, train_storage
from pipelines.tune.space import Dimension, apply_values, check_space
from pipelines.tune.trial import TrialPlan, n_val_reports, prepare_dataset, prepare_tokenizer, run_trial

TRIAL_MEMORY = 256 * 2**20  # bytes: the trial process, which loads the fine-tuned model to score it
SHOWN = ("val_i2t_r1", "val_vqa_acc", "val_itm_acc", "val_bleu4")  # besides the metric, in the table


def known_metrics() -> tuple[str, ...]:
    from mmcore.tasks import TASKS
    from pipelines.core.records import ALL_METRICS

    # validation logs `val_<task>_loss` for each task a run trains (`pipelines.train.steps`)
    return tuple(f"val_{m}" for m in ALL_METRICS) + tuple(f"val_{t}_loss" for t in TASKS)


@dataclass
class SearchSpec:
    """How to search: the space, the budget, the objective and ASHA's shape."""

    dims: list[Dimension]
    samples: int = 4
    metric: str = "val_i2t_r1"
    mode: str = "max"
    concurrency: int | None = None  # None = as many trials as the cluster's CPUs (GPUs) hold
    grace: int = 1  # ASHA: validation reports before a trial can be stopped
    reduction: float = 2.0  # ASHA: keep the best 1/reduction at each rung
    seed: int | None = None
    name: str | None = None
    experiment: str | None = None
    data_dir: str | None = None  # None = prepare the config's data, as `mmfusion run` does


@dataclass
class TrialRow:
    trial_id: str
    status: str  # done | stopped (by ASHA) | error
    values: dict[str, Any]
    reports: int
    score: float | None  # the last reported value of the metric
    metrics: dict[str, Any] = field(default_factory=dict)  # the last report
    error: str | None = None


@dataclass
class SearchResult:
    name: str
    spec: SearchSpec
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Config | None
    storage: str  # Tune's results folder (local path or URI)
    experiment: str
    max_reports: int


def check_spec(cfg: Config, spec: SearchSpec) -> None:
    """Everything a user can get wrong, before Ray starts."""
    check_space(cfg, spec.dims)
    if spec.samples < 1:
        raise ConfigError(f"--samples {spec.samples}: run at least one trial")
    if spec.metric not in known_metrics():
        raise ConfigError(f"--metric {spec.metric}: not a validation metric the trials report; "
                          f"use one of {', '.join(known_metrics())}")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"--mode {spec.mode}: use min or max")
    if spec.concurrency is not None and spec.concurrency < 1:
        raise ConfigError(f"--concurrency {spec.concurrency}: run at least one trial at a time")
    if spec.grace < 1 or spec.reduction <= 1:
        raise ConfigError("ASHA needs --grace >= 1 and --reduction > 1")


def pinned_base(cfg: Config) -> dict[str, Any]:
    """The config tree with the state dir, MLflow and storage resolved here, so that trials on
    any node write where the driver reads."""
    tree = cfg.to_dict()
    tree["services"].update(home=str(home_dir(cfg)), mlflow_tracking_uri=mlflow_tracking_uri(cfg))
    tree["train"]["storage"] = train_storage(cfg)
    return tree


def tune_storage(cfg: Config) -> str:
    """Tune's results beside the Ray Train runs (`train.storage`: local, or object storage)."""
    return f"{train_storage(cfg).rstrip('/')}/tune"


def default_concurrency(cfg: Config) -> int:
    import ray

    have = ray.cluster_resources()
    s = cfg.scaling
    fits = have.get("CPU", 1.0) // max(s.max_workers * s.cpus_per_worker, 1e-9)
    if s.use_gpu:
        fits = min(fits, have.get("GPU", 0.0) // max(s.max_workers * s.gpus_per_worker, 1e-9))
    return max(1, int(fits))


def build_tuner(cfg: Config, spec: SearchSpec, plan: TrialPlan, callbacks: list):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    max_t = n_val_reports(cfg)
    # Phase losses (val_pretrain_loss) and end-of-trial scores (val_vqa_acc) are not in every
    # report; ASHA skips a report without its metric, but Tune's strict check would fail the search.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=spec.metric, mode=spec.mode, max_t=max_t,
                              grace_period=min(spec.grace, max_t), reduction_factor=spec.reduction)
    # The trial's own process only waits on Ray Train and on scoring tasks, which reserve CPUs
    # (GPUs) themselves; Tune needs a non-empty reservation, so the trial holds memory only.
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": 0, "memory": TRIAL_MEMORY})
    return tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune() for d in spec.dims},
        tune_config=tune.TuneConfig(
            scheduler=scheduler, num_samples=spec.samples,
            # The generator limits concurrency itself (Tune ignores max_concurrent_trials with it).
            search_alg=BasicVariantGenerator(random_state=spec.seed,
                                             max_concurrent=spec.concurrency or default_concurrency(cfg)),
        ),
        run_config=tune.RunConfig(name=plan.search_name, storage_path=tune_storage(cfg), callbacks=callbacks,
                                  verbose=1),
    )


def run_search(cfg: Config, spec: SearchSpec) -> SearchResult:
    """Prepare data, run the trials, and pick the best finished one."""
    from pipelines.core.mlflow import artifact_location
    from pipelines.runtime import init_ray
    from pipelines.train.driver import check_resources
    from pipelines.tune.cleanup import ReleaseEndedTrials
    from pipelines.tune.tracking import TrialsToMlflow

    check_spec(cfg, spec)
    init_ray(cfg)
    check_resources(cfg)
    name = spec.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = spec.experiment or f"{cfg.registry.experiment}-tune"
    data_dir = spec.data_dir or prepare_dataset(cfg)
    prepare_tokenizer(cfg, data_dir)
    plan = TrialPlan(base=pinned_base(cfg), data_dir=str(data_dir), search_name=name, experiment=experiment)
    tracker = TrialsToMlflow(mlflow_tracking_uri(cfg), experiment, name, n_val_reports(cfg),
                             {"base_config_hash": cfg.hash(), "metric": spec.metric, "mode": spec.mode,
                              "space": "; ".join(f"{d.key}={d.describe()}" for d in spec.dims),
                              "data_dir": str(data_dir)}, artifact_location(cfg, experiment))
    print(f"[tune] {name}: {spec.samples} sample(s) over {', '.join(d.key for d in spec.dims)}; "
          f"ASHA on {spec.metric} ({spec.mode}), {n_val_reports(cfg)} validation reports a trial", flush=True)
    grid = build_tuner(cfg, spec, plan, [tracker, ReleaseEndedTrials(name)]).fit()
    rows = [trial_row(r, spec) for r in grid]
    best = pick_best(rows, spec.mode)
    best_config = apply_values(cfg.to_dict(), best.values) if best else None
    tracker.log_best(best.trial_id if best else None, best.score if best else None)
    return SearchResult(name, spec, rows, best, best_config, f"{tune_storage(cfg)}/{name}", experiment,
                        n_val_reports(cfg))


def trial_row(result, spec: SearchSpec) -> TrialRow:
    """One trial's outcome from its Tune result: every report, not only the last."""
    history = result.metrics_dataframe
    metrics = dict(result.metrics or {})
    values = {d.key: _plain(result.config.get(d.key)) for d in spec.dims}
    score = None
    if history is not None and spec.metric in history:
        column = history[spec.metric].dropna()
        score = float(column.iloc[-1]) if len(column) else None
    reports = int(metrics.get("training_iteration", 0) or 0)
    if result.error is not None:
        status = "error"
    else:
        status = "done" if metrics.get("phase") == "final" else "stopped"
    return TrialRow(str(metrics.get("trial_id") or Path(result.path).name), status, values, reports, score,
                    metrics, str(result.error).splitlines()[0] if result.error else None)


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best score among trials that finished (all of them if none did)."""
    pool = [r for r in rows if r.status == "done" and _finite(r.score)]
    pool = pool or [r for r in rows if _finite(r.score)]
    if not pool:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(pool, key=lambda r: sign * r.score)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# ----------------------------------------------------------------------------- output


def results_table(result: SearchResult) -> str:
    """A Markdown table of every trial, best first (finished trials before stopped ones)."""
    spec = result.spec
    shown = [spec.metric, *[m for m in SHOWN if m != spec.metric]]
    keys = [d.key for d in spec.dims]
    head = ["trial", "status", "reports", *keys, *shown]
    sign = -1.0 if spec.mode == "max" else 1.0
    order = sorted(result.rows, key=lambda r: (r.status != "done", sign * r.score if _finite(r.score) else math.inf))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in order:
        mark = " (best)" if result.best is r else ""
        cells = [f"{r.trial_id}{mark}", r.status, f"{r.reports}/{result.max_reports}",
                 *[_fmt(r.values.get(k)) for k in keys],
                 _fmt(r.score), *[_fmt(r.metrics.get(m)) for m in shown[1:]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_config_yaml(result: SearchResult) -> str:
    """The base config with the best trial's values, as YAML `--config` accepts."""
    if result.best is None or result.best_config is None:
        return ""
    best, spec = result.best, result.spec
    header = [f"# mmfusion tune {result.name}: the best of {len(result.rows)} trial(s), trial {best.trial_id}",
              f"# {spec.metric} = {best.score:.4g} ({spec.mode}) on the validation split",
              *[f"# {k}: {_fmt(v)}" for k, v in best.values.items()]]
    return "\n".join(header) + "\n" + yaml.safe_dump(result.best_config.to_dict(), sort_keys=False)
