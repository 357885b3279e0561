"""Options every command shares: `--config FILE` and repeated `--set dotted.key=value`."""

from __future__ import annotations

import argparse

from pipelines.config import Config, load_config
from pipelines.runtime import quiet_environment


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "local") -> None:
    parser.add_argument(
        "--config",
        default=default,
        metavar="FILE",
        help="YAML config file, or a preset name: debug, local, cluster (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.steps=50 --set scaling.num_workers=1 "
        "(repeatable; values are YAML scalars)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    quiet_environment()
    return load_config(args.config, args.overrides)
