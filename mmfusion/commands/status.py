"""`mmfusion status`: one screen on the champion, the last runs, the next run and the Ray cluster."""

from __future__ import annotations

import argparse

from mmfusion.commands.common import add_config_args, config_from_args
from mmfusion.commands.run import configure_prefect

HEADLINE = ("i2t_r1", "t2i_r1", "bleu4", "cider_d", "vqa_acc", "grounding_f1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "status", help="one screen: champion and metrics, last flow runs, next scheduled run, Ray nodes",
        description="The champion of the config's registered model and its headline metrics (MLflow), the "
        "last flow runs with their states and durations and the next scheduled run (Prefect), and the "
        "Ray cluster's nodes and resources (RAY_ADDRESS). A part that cannot be reached says why.")
    add_config_args(p)
    p.add_argument("--runs", type=int, default=5, help="how many recent flow runs (default: %(default)s)")
    p.set_defaults(func=status)


def status(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    configure_prefect(cfg)
    for title, part in (("champion", _champion), ("flow runs", _runs), ("ray", _ray)):
        try:
            lines = part(cfg, args)
        except Exception as e:  # one service down must not hide the others
            lines = [f"  unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        print(title)
        print("\n".join(lines))
    return 0


def _champion(cfg, args) -> list[str]:
    from pipelines.config import mlflow_tracking_uri
    from pipelines.core.mlflow import redact
    from pipelines.registry import show

    name = cfg.registry.model_name
    try:
        champ = show(cfg, f"{name}@champion")
    except Exception as e:
        return [f"  {name}: no champion ({str(e).splitlines()[0]}) at {redact(mlflow_tracking_uri(cfg))}"]
    metrics = "  ".join(f"{k}={champ['metrics'][k]:.3f}" for k in HEADLINE if k in champ["metrics"])
    data = champ["tags"].get("dataset_version", "?")
    return [f"  {name} v{champ['version']}  data={data}  ({redact(mlflow_tracking_uri(cfg))})", f"  {metrics}"]


def _runs(cfg, args) -> list[str]:
    from flows.status import prefect_summary

    summary = prefect_summary(args.runs)
    lines = [f"  {r['flow']:<8} {r['name']:<24} {r['state']:<10} {_when(r['start'])}  {_dur(r['duration_s'])}"
             for r in summary["runs"]] or ["  none yet"]
    nxt = summary["next"]
    lines.append(f"  next: {nxt['flow']} {nxt['name']} at {_when(nxt['start'])}" if nxt else "  next: none scheduled")
    return lines


def _ray(cfg, args) -> list[str]:
    from pipelines.ops.cluster import ray_nodes

    nodes = ray_nodes(cfg)
    if nodes is None:
        return ["  no cluster (RAY_ADDRESS unset): each command starts its own Ray"]
    return [f"  {'head  ' if n['head'] else 'worker'} {n['address']:<15} CPU {n['cpu']:g}  GPU {n['gpu']:g}  "
            f"memory {n['memory_gb']:.1f} GiB" for n in nodes]


def _when(ts) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "-"


def _dur(seconds) -> str:
    return f"{seconds:.0f} s" if seconds is not None else "-"
