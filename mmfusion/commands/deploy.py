"""`mmfusion deploy`: the `retrain` and `ingest` deployments on work pool `mmfusion`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmfusion.commands.common import add_config_args, config_from_args
from mmfusion.commands.run import configure_prefect

DESCRIPTION = """\
Create (or update) two Prefect deployments on work pool `mmfusion`, run by a process worker from
this checkout (no container image):
  retrain/NAME   the whole pipeline on --config (optionally on a --cron schedule)
  ingest/NAME    one raw source into a dataset version (parameters: source, format)
NAME defaults to the config file's stem. Needs a Prefect server (PREFECT_API_URL), e.g. from
`eval "$(mmfusion stack up)"`, whose worker runs the flows against the stack's Ray and MLflow.

examples:
  mmfusion deploy --config configs/debug.yaml --name smoke
  prefect deployment run retrain/smoke --watch
  prefect deployment run ingest/smoke --param source=/data/raw --param format=jsonl
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("deploy", help="create/update the retrain and ingest deployments on work pool "
                              "`mmfusion`", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default=None)
    p.add_argument("--name", help="deployment name (default: the config file's stem, e.g. `debug`)")
    p.add_argument("--cron", help="a cron schedule for retrain/NAME, e.g. '0 2 * * *' (default: none; "
                   "runs only when triggered)")
    p.set_defaults(func=deploy)


def deploy(args: argparse.Namespace) -> int:
    if not args.config:
        print("mmfusion deploy: --config is required (a YAML file such as configs/debug.yaml, or a preset "
              "name)", file=sys.stderr)
        return 2
    cfg = config_from_args(args)  # a bad config fails here, before anything is deployed
    configure_prefect(cfg)
    if not os.environ.get("PREFECT_API_URL"):
        print("mmfusion deploy: no Prefect server: set PREFECT_API_URL (e.g. `eval \"$(mmfusion stack up)\"`); "
              "a worker must be able to reach it", file=sys.stderr)
        return 2
    from flows.deployments import deploy_to_pool

    name = args.name or Path(args.config).stem
    ids = deploy_to_pool(name, args.config, list(args.overrides), args.cron)
    for deployment, dep_id in ids.items():
        print(f"deployed {deployment} ({dep_id}) on work pool 'mmfusion'")
    print(f"run it: prefect deployment run retrain/{name} --watch")
    return 0
