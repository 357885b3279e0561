"""`mmfusion run`: the whole pipeline as the Prefect flow `retrain`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from mmfusion.commands.common import add_config_args, config_from_args
from pipelines.config import Config, home_dir, mlflow_tracking_uri
from pipelines.core.mlflow import redact


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the whole pipeline: data -> pretrain -> fine-tune -> evaluate -> register",
        description=(
            "Run the Prefect flow `retrain`: synthesise data when no data.source is set, ingest it "
            "into WebDataset shards (Ray tasks), pretrain and fine-tune (Ray Train), evaluate on the "
            "test split, register the checkpoint in MLflow and promote it to `champion` when it "
            "beats the current one. Ends with a report of where everything is."
        ),
    )
    add_config_args(p)
    p.set_defaults(func=run)
    register_schedule(subparsers)


def configure_prefect(cfg: Config) -> None:
    """Point Prefect at the configured server, else keep its state under the mmfusion home.

    Must run before prefect is imported: Prefect reads these settings at import time.
    """
    if cfg.services.prefect_api_url:
        os.environ["PREFECT_API_URL"] = cfg.services.prefect_api_url
    if not os.environ.get("PREFECT_API_URL"):
        prefect_home = home_dir(cfg) / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)  # its SQLite file cannot be created otherwise
        os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # Prefect's default (20 s) is too short for the ephemeral API on a busy laptop.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    configure_prefect(cfg)
    from flows.retrain import retrain

    summary = retrain(config=args.config, overrides=list(args.overrides))
    print(format_report(cfg, summary))
    return 0


def format_report(cfg: Config, summary: dict[str, Any]) -> str:
    """The short plain-text report printed at the end of `mmfusion run`."""
    if summary.get("skipped"):  # nothing changed since a registered version was trained
        return "\n".join(["", "=" * 72, "mmfusion run: nothing trained", "=" * 72,
                          f"data        {summary['data_dir']}"
                          f"{' (reused: unchanged)' if summary.get('dataset_reused') else ''}",
                          f"skipped     {summary['skipped']}"])
    report, reg = summary["report"], summary["registration"]
    metrics = report.get("metrics", {})
    lines = ["", "=" * 72, "mmfusion run finished", "=" * 72]
    lines += [
        f"data        {summary['data_dir']}",
        f"checkpoint  {summary['checkpoint']}",
        f"model       {reg.get('model_uri')}  (run {reg.get('run_id')})",
        f"champion    {'promoted: ' if reg.get('promoted') else 'unchanged: '}{reg.get('reason')}",
        *_calibration_line(summary.get("itm_calibration")),
        "",
        "test-split metrics:",
    ]
    lines += [f"  {k:<14} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    lines += ["", "generated captions vs ground truth:"]
    for ex in report.get("examples", []):
        lines += [f"  [{ex['key']}]", f"    model: {ex['generated']}"]
        lines += [f"    truth: {ref}" for ref in ex["references"][:2]]
    lines += ["", "figures:", *(f"  {name:<16} {path}" for name, path in summary.get("figures", {}).items())]
    lines += ["", "dashboards:", *dashboard_hints(cfg, summary)]
    return "\n".join(lines)


def _calibration_line(calibration: dict[str, Any] | None) -> list[str]:
    """How ITM scores (train.calibrate_itm): calibrated on the validation split, or why not."""
    if not calibration:
        return []
    if "skipped" in calibration:
        return [f"ITM         head alone: {calibration['skipped']}"]
    return [f"ITM         calibrated on {calibration['val_pairs']} validation pairs: accuracy there "
            f"{calibration['val_acc_head']:.3f} (head alone) -> {calibration['val_acc_calibrated']:.3f}"]


def dashboard_hints(cfg: Config, summary: dict[str, Any]) -> list[str]:
    home = home_dir(cfg)
    tracking = redact(mlflow_tracking_uri(cfg))  # a server URI may carry credentials
    prefect_api = os.environ.get("PREFECT_API_URL")
    prefect = (
        f"  Prefect  open {prefect_api.removesuffix('/api')} (flow run 'retrain')"
        if prefect_api
        else f"  Prefect  PREFECT_HOME={home / 'prefect'} prefect server start   "
        "# then http://127.0.0.1:4200"
    )
    mlflow = (
        f"  MLflow   mlflow ui --backend-store-uri {tracking}   # then http://127.0.0.1:5000"
        if tracking.startswith("sqlite")
        else f"  MLflow   open {tracking}"
    )
    ray_url = summary.get("ray_dashboard")
    ray = (
        f"  Ray      {ray_url} while Ray runs; a local Ray stops with the run: start a lasting one "
        "with `ray start --head` and set RAY_ADDRESS=auto"
    )
    return [prefect, mlflow, ray if ray_url else "  Ray      `ray start --head`, set RAY_ADDRESS=auto, "
            "then http://127.0.0.1:8265"]


def register_schedule(subparsers) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="serve the retrain flow on a cron schedule (needs a Prefect server)",
        description=(
            "Create a Prefect deployment of the `retrain` flow with a cron schedule and serve it: "
            "this process runs each scheduled or UI-triggered flow run until stopped (Ctrl-C). "
            "Point PREFECT_API_URL (or services.prefect_api_url) at a running Prefect server."
        ),
    )
    add_config_args(p)
    p.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: %(default)s, nightly)")
    p.add_argument("--name", default="nightly", help="deployment name (default: %(default)s)")
    p.set_defaults(func=schedule)


def schedule(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    configure_prefect(cfg)
    from flows.deployments import serve_retrain

    print(f"serving deployment retrain/{args.name} on cron {args.cron!r} (Ctrl-C to stop)")
    serve_retrain(args.name, args.config, list(args.overrides), args.cron)
    return 0
