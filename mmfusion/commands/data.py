"""`mmfusion data synth | ingest | inspect | validate`."""

from __future__ import annotations

import argparse
import json
import sys

from mmfusion.commands.common import add_config_args, config_from_args
from pipelines.ingest.sources import FORMATS  # the ingest sources own the list


def _synth(args: argparse.Namespace) -> int:
    from pipelines.ingest.speech import SpeechError
    from pipelines.ingest.synth import synthesize

    try:
        out = synthesize(args.out, args.num, args.seed, audio=args.audio)
    except SpeechError as e:
        print(f"mmfusion data synth: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from pipelines.config import datasets_root
    from pipelines.ingest import ingest
    from pipelines.runtime import init_ray, shutdown_ray

    cfg = config_from_args(args)
    source = args.source or cfg.data.source
    if not source:
        print("mmfusion data ingest: no source; pass --source PATH (or set data.source)", file=sys.stderr)
        return 2
    out = args.out or datasets_root(cfg)
    # The configured cluster, or a local Ray, reached only when there is cleaning to do: an ingest
    # of unchanged inputs returns the version it made before without starting Ray.
    connected = []  # whether this command reached Ray
    version_dir = ingest(source, out, cfg.data, fmt=args.format,
                         connect=lambda: connected.append(init_ray(cfg, include_dashboard=False)))
    print(version_dir, flush=True)  # the LAST line of stdout: scripts and flows read it
    if connected:
        # Now that everything is written, not at exit: Ray's exit hook would first sleep 0.5 s
        # for its workers' last log lines, and an ingest's workers have none left by then.
        shutdown_ray()
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipelines.ingest.inspection import inspect_version

    info = inspect_version(args.dir, args.samples)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"version {info['version']} ({info['format']}, created {info['created']})")
    print(f"seen {info['seen']}  kept {info['kept']}  duplicates {info['duplicates']}  dedup {info['dedup']}")
    if info.get("media"):
        m = info["media"]
        print(f"with an image {m['images']}  with audio {m['audio']} ({m['audio_s'] / 60:.1f} min)")
    for split, c in info["splits"].items():
        print(f"  {split:5s} {c['samples']:7d} samples  {c['shards']:4d} shards  {c['bytes'] / 1e6:9.2f} MB")
    print("rejected:" + ("" if info["rejected"] else " none"))
    for reason, n in sorted(info["rejected"].items(), key=lambda x: -x[1]):
        print(f"  {reason:24s} {n}")
    for ex in info["examples"]:
        media = [f"{ex['size'][0]}x{ex['size'][1]}"] if "size" in ex else []
        media += [f"{ex['audio_s']:.1f} s audio"] if "audio_s" in ex else []
        print(f"  [{ex['key']}] {ex['caption']!r} ({ex['captions']} captions, {ex['qa']} QA, {', '.join(media)})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pipelines.ingest.inspection import validate_version

    result = validate_version(args.dir)
    for p in result["problems"]:
        print(f"PROBLEM {p}")
    print(f"{'OK' if result['ok'] else 'FAILED'}: {result['samples']} samples checked in {args.dir}")
    return 0 if result["ok"] else 1


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="make, ingest and check datasets")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: data.print_help() or 2)

    p = sub.add_parser("synth", help="write the synthetic captioned-shapes set (raw JSONL + images)")
    p.add_argument("--out", required=True, help="output folder (samples.jsonl + images/, + audio/ with --audio)")
    p.add_argument("--num", type=int, default=600, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--audio", action="store_true",
                   help="also speak each caption and ask each question by voice (needs espeak-ng; "
                        "what data.synth_audio does in a run)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("ingest", help="clean, dedup, split and shard a raw source into a dataset version",
                       description="Cleans in Ray tasks; prints the dataset version directory as the last line.")
    p.add_argument("--source", help="file, folder or URI (s3://, http(s)://) of the raw data (default: data.source)")
    p.add_argument("--out", help="root that holds dataset versions (default: data.root or $MMFUSION_HOME/datasets)")
    p.add_argument("--format", choices=FORMATS, help="source format (default: guessed from the source)")
    add_config_args(p)
    p.set_defaults(func=_ingest)

    p = sub.add_parser("inspect", help="counts per split, reject reasons and a few samples of a version")
    p.add_argument("dir", help="dataset version directory")
    p.add_argument("--samples", type=int, default=3, help="samples to show (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("validate", help="check every shard checksum and decode every sample")
    p.add_argument("dir", help="dataset version directory")
    p.set_defaults(func=_validate)
