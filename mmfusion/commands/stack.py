"""`mmfusion stack up | status | down`: real local servers for Prefect, MLflow and Ray."""

from __future__ import annotations

import argparse
import shlex
import sys

from pipelines.config import home_dir
from pipelines.runtime import quiet_environment

DESCRIPTION = """\
Start, inspect or stop a local stack of real services, each bound to 127.0.0.1:
PostgreSQL (a private cluster, or yours with --postgres URL), the Prefect server on it, a Prefect
process worker on work pool `mmfusion`, the MLflow server on it (artifacts on a local path or an
s3:// URI), a Ray head and one Ray worker node (token authentication on).

`up` waits until each service is healthy, then prints `export NAME=value` lines: run it as
    eval "$(mmfusion stack up)"
to point mmfusion, prefect, mlflow and ray at the stack. `up` again reports what already runs.
`down` stops exactly the processes `up` started, and nothing else (never a bare `ray stop`).
State and logs: $MMFUSION_HOME/stack/ (default ./.mmfusion/stack/).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("stack", help="start / inspect / stop local Prefect, MLflow, PostgreSQL and Ray "
                              "servers", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start what is not running; print the export lines")
    up.add_argument("--postgres", metavar="URL", help="use this PostgreSQL server (postgresql://user:pw@host:port/db) "
                    "instead of starting one; its databases `prefect` and `mlflow` are created when missing")
    up.add_argument("--artifacts", metavar="URI", help="the MLflow server's artifact root: a local path or "
                    "s3://bucket/prefix (default: $MMFUSION_HOME/stack/mlflow-artifacts). For S3, the server reads "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and, for an S3-compatible server, "
                    "MLFLOW_S3_ENDPOINT_URL from this command's environment")
    up.set_defaults(func=stack_up)
    sub.add_parser("status", help="each service's health and address (exit 1 unless all are healthy)"
                   ).set_defaults(func=stack_status)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=stack_down)


def _stack(args: argparse.Namespace):
    quiet_environment()
    from pipelines.ops import Stack

    return Stack(home_dir(None), postgres_url=getattr(args, "postgres", None),
                 artifacts=getattr(args, "artifacts", None))


def _fail(error: Exception) -> int:
    print(f"mmfusion stack: {error}", file=sys.stderr)
    return 1


def stack_up(args: argparse.Namespace) -> int:
    from pipelines.ops import StackError
    from pipelines.ops.postgres import PostgresError

    stack = _stack(args)
    try:
        env = stack.up()
    except (StackError, PostgresError) as e:
        return _fail(e)
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    ray_dashboard = f"http://127.0.0.1:{stack.load()['ports']['ray_dashboard']}"
    print(f"dashboards: Prefect {env['PREFECT_API_URL'].removesuffix('/api')}  MLflow {env['MLFLOW_TRACKING_URI']}"
          f"  Ray {ray_dashboard}", file=sys.stderr)
    return 0


def stack_status(args: argparse.Namespace) -> int:
    rows = _stack(args).status()
    for row in rows:
        pid = f"pid {row['pid']}" if row["pid"] else ""
        print(f"{row['name']:<15} {row['state']:<10} {row['address']}  {pid}")
    return 0 if all(r["state"] == "healthy" for r in rows) else 1


def stack_down(args: argparse.Namespace) -> int:
    stopped = _stack(args).down()
    if not stopped:
        print("nothing of the stack was running", file=sys.stderr)
    return 0
