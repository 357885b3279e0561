"""`mmfusion`: the command line. One subcommand module per area (mmfusion/commands/)."""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import sys

from mmfusion import __version__

# Each module exposes register(subparsers); they import their heavy dependencies lazily so that
# `mmfusion --help` stays fast.
COMMAND_MODULES = ("run", "data", "train", "evaluate", "registry", "infer", "tune", "stack", "deploy", "status")

EPILOG = """\
examples:
  mmfusion run                                   # the whole pipeline on the embedded defaults
  mmfusion run --config configs/debug.yaml       # the same in seconds (tiny data, few steps)
  mmfusion data synth --out raw/ --num 500
  mmfusion data ingest --source raw/ --out datasets/
  mmfusion train pretrain --data datasets/<version> --set train.steps=100
  mmfusion eval --model models:/mmfusion-debug@champion --data datasets/<version>
  mmfusion caption photo.jpg --model models:/mmfusion-debug@champion
  mmfusion tune --config debug --samples 4       # hyperparameter search (Ray Tune, ASHA)
  eval "$(mmfusion stack up)"                    # local PostgreSQL, Prefect + worker, MLflow, Ray
  mmfusion deploy --config configs/debug.yaml --name smoke   # retrain/smoke, ingest/smoke
  mmfusion status                                # champion, last runs, next run, Ray nodes

Services come from the config's `services` section or RAY_ADDRESS, PREFECT_API_URL and
MLFLOW_TRACKING_URI; local state lives under $MMFUSION_HOME (default ./.mmfusion).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfusion",
        description="Raw image-text data to a registered, evaluated multimodal fusion model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mmfusion {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"mmfusion.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Registered first, so run last at exit (after Ray's shutdown hook, which a command registers
    # when it imports Ray): frozen objects are not walked by the interpreter's final collections,
    # which would take ~0.5 s of a core to free memory the OS takes back anyway. Only cyclic
    # garbage goes unfinalised; every file a command writes is closed before it returns.
    atexit.register(gc.freeze)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pipelines.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"mmfusion: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmfusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
