"""`mmfusion registry`: list, show, promote and roll back registered model versions."""

from __future__ import annotations

import argparse
import json

from mmfusion.commands.common import add_config_args, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("registry", help="the MLflow model registry: list | show | promote | rollback",
                              description="Inspect and manage registered model versions and the `champion` alias.")
    sub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="registered models, their versions, aliases and headline metrics")
    add_config_args(ls)
    ls.set_defaults(func=run_list)
    show = sub.add_parser("show", help="one version: NAME (its champion), NAME@ALIAS or NAME/VERSION")
    add_config_args(show)
    show.add_argument("ref", metavar="NAME[@alias|/version]")
    show.set_defaults(func=run_show)
    promote = sub.add_parser("promote", help="make VERSION the champion by hand (bypasses the gate; recorded)")
    add_config_args(promote)
    promote.add_argument("name")
    promote.add_argument("version")
    promote.set_defaults(func=run_promote)
    rollback = sub.add_parser("rollback", help="move `champion` back to the version it replaced")
    add_config_args(rollback)
    rollback.add_argument("name")
    rollback.set_defaults(func=run_rollback)


def _guard(fn):
    from pipelines.registry import ModelURIError

    try:
        return fn()
    except ModelURIError as e:
        print(f"mmfusion registry: {e}")
        return None


def run_list(args: argparse.Namespace) -> int:
    from pipelines.registry import list_models

    cfg = config_from_args(args)
    models = list_models(cfg)
    if not models:
        print("no registered models yet (register one with `mmfusion run` or the retrain flow)")
    primary = cfg.registry.primary_metric
    for m in models:
        print(f"{m['name']}  aliases: {m['aliases'] or '-'}")
        for v in m["versions"]:
            metric = v["metrics"].get(primary)
            mark = "*" if "champion" in v["aliases"] else " "
            print(f" {mark} v{v['version']:<4} {primary}={'n/a' if metric is None else f'{metric:.4f}'}  "
                  f"data={v['tags'].get('dataset_version', '?')[:16]}  gate={v['tags'].get('gate.promote', '-')}  "
                  f"{','.join(v['aliases'])}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from pipelines.registry import show

    info = _guard(lambda: show(config_from_args(args), args.ref))
    if info is None:
        return 1
    print(json.dumps(info, indent=2, default=str))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    from pipelines.registry import promote

    out = _guard(lambda: promote(config_from_args(args), args.name, args.version))
    if out is None:
        return 1
    print(f"{out['name']}: champion is now v{out['champion']} (was {out['previous'] or 'none'})")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from pipelines.registry import rollback

    return 0 if _guard(lambda: rollback(config_from_args(args), args.name)) else 1
