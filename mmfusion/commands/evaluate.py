"""`mmfusion eval`: score a model on a dataset version's test split and print its report card."""

from __future__ import annotations

import argparse
import json

from mmfusion.commands.common import add_config_args, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on a dataset version's fixed test split (report card)",
        description="Run a model over DATA's test split: retrieval R@1/5/10 both ways, BLEU-4, CIDEr-D, "
        "VQA and ITM accuracy; for a model with an audio encoder also WER, spoken VQA, audio captioning and "
        "audio-text retrieval (--set eval.audio_rerank_k=K re-ranks its top K by the speech decoder's "
        "likelihood). Writes report_card.json and per_sample.jsonl.",
    )
    add_config_args(p)
    p.add_argument("--model", default=None, metavar="URI",
                   help="checkpoint directory, models:/NAME@ALIAS or models:/NAME/VERSION "
                   "(default: models:/<registry.model_name>@champion)")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset version directory (from `mmfusion data ingest`)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the report (default: under the state dir)")
    p.add_argument("--rerank-k", type=int, default=None, help="re-rank the top K retrieval candidates with ITM")
    p.add_argument("--json", action="store_true", help="print the report card as JSON")
    p.set_defaults(func=run)


def print_report(report: dict) -> None:
    print(f"model:     {report['model_uri']}")
    print(f"benchmark: {report['benchmark']} ({report['num_images']} images, {report['num_captions']} captions, "
          f"{report['num_questions']} questions)")
    for k, v in report["metrics"].items():
        print(f"  {k:<8} {'n/a' if v is None else f'{v:.4f}'}")
    for ex in report["examples"]:
        print(f"  [{ex['key']}] generated: {ex['generated']!r} | reference: {ex['references'][0]!r}")
    print(f"report card: {report['report_card_path']}\nper-sample:  {report['per_sample_path']}")


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate

    cfg = config_from_args(args)
    if args.rerank_k is not None:
        cfg.eval.itm_rerank_k = args.rerank_k
    model = args.model or f"models:/{cfg.registry.model_name}@champion"
    report = evaluate(cfg, model, args.data, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0
