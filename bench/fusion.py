"""Which fusion to choose: cross-attention, gated weighted sum and concat + MLP, each trained by the
default run's own recipe and budget.

For each seed, and each fusion in turn within it, runs the real `mmfusion run --config C --set
model.fusion=F --set train.seed=S` in a fresh state directory, as `bench/learn.py` does: synthesise
and ingest, pretrain and fine-tune on Ray Train, calibrate ITM, evaluate, register. Everything but
`model.fusion` is the config's. Runs go one at a time (each uses the machine's cores). Prints, and
with `--out` writes, a table of every report-card metric as mean ± std over the seeds, the run's
wall time and the model's parameters.

Each finished run's result is kept as `--results DIR/FUSION-SEED.json`; run again with the same
directory and the bench continues where it stopped instead of training those runs again.

    python bench/fusion.py [--config local] [--seeds 3] [--fusions cross_attention,gated,concat]
                           [--results DIR] [--out FILE.md] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/fusion.py`: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.learn import one_round  # noqa: E402

FUSIONS = ("cross_attention", "gated", "concat")
SHOWN = ("i2t_r1", "t2i_r1", "itm_acc", "vqa_acc", "vqa_count", "vqa_colour", "vqa_size", "vqa_shape",
         "vqa_yesno", "bleu4", "cider_d", "grounding_f1")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="local", help="config file or preset (default: local, the default run)")
    p.add_argument("--seeds", type=int, default=3, help="train.seed 0..N-1 for each fusion (default 3)")
    p.add_argument("--fusions", default=",".join(FUSIONS), help=f"comma-separated (default {','.join(FUSIONS)})")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="keep each run's result here and reuse those already there (default: a new temporary directory)")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (not model.fusion or train.seed: the bench sets those)")
    args = p.parse_args(argv)
    fusions = [f for f in args.fusions.split(",") if f]
    unknown = sorted(set(fusions) - set(FUSIONS))
    if unknown or not fusions:
        p.error(f"--fusions {args.fusions!r}: unknown {unknown}; choose from {', '.join(FUSIONS)}")
    args.fusions = fusions
    fixed = {o.split("=", 1)[0].strip() for o in args.overrides} & {"model.fusion", "train.seed"}
    if fixed:
        p.error(f"--set {', '.join(sorted(fixed))}: the bench sets these per run; use --fusions / --seeds")
    return args


def model_facts(checkpoint: str) -> dict:
    """What the evaluated checkpoint is: its fusion and its parameters, from its config (no weights read)."""
    from mmcore.checkpoint import read_config
    from mmcore.model import build_model, count_parameters

    model_cfg, _ = read_config(checkpoint)
    return {"fusion": model_cfg.fusion.kind, "params": count_parameters(build_model(model_cfg, load_pretrained=False))}


def run(args: argparse.Namespace, fusion: str, seed: int, results: Path) -> dict:
    """One `mmfusion run` with this fusion and seed, or its kept result."""
    path = results / f"{fusion}-{seed}.json"
    if path.is_file():
        print(f"[fusion] {fusion} seed {seed}: kept result {path}", flush=True)
        return json.loads(path.read_text())
    print(f"[fusion] {fusion} seed {seed}: mmfusion run --config {args.config} --set model.fusion={fusion}",
          flush=True)
    learn_args = argparse.Namespace(config=args.config, overrides=[*args.overrides, f"model.fusion={fusion}"],
                                    keep=False)
    r = one_round(learn_args, seed, measure=model_facts)
    if r["measured"]["fusion"] != fusion:
        raise SystemExit(f"the {fusion} run evaluated a {r['measured']['fusion']} model: is model.fusion set by --config?")
    result = {"fusion": fusion, "seed": seed, "wall_s": r["wall_s"], "metrics": r["metrics"],
              "params": r["measured"]["params"], "itm_calibration": r["itm_calibration"]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # a result file is whole or absent
    print(f"[fusion] {fusion} seed {seed} done in {r['wall_s']:.0f}s: grounding F1 "
          f"{r['metrics'].get('grounding_f1', float('nan')):.3f}, VQA {r['metrics'].get('vqa_acc', float('nan')):.3f}",
          flush=True)
    return result


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def summarise(runs: list[dict], fusions: list[str]) -> str:
    """Markdown: each metric's mean ± std per fusion over its seeds, wall time, parameters."""
    head = "| metric | " + " | ".join(fusions) + " |\n|---|" + "---|" * len(fusions)
    rows = []
    for m in SHOWN:
        cells = [cell([r["metrics"][m] for r in runs if r["fusion"] == f and r["metrics"].get(m) is not None], ".3f")
                 for f in fusions]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    rows.append("| run wall s | " + " | ".join(cell([r["wall_s"] for r in runs if r["fusion"] == f], ".0f")
                                              for f in fusions) + " |")
    rows.append("| parameters | " + " | ".join(f"{next(r['params'] for r in runs if r['fusion'] == f):,}"
                                              for f in fusions) + " |")
    return "\n".join([head, *rows])


def per_run(runs: list[dict]) -> str:
    """Markdown: one line per run, the headline metrics."""
    lines = ["| fusion | seed | ITM | VQA | shape Q | i2t R@1 | BLEU-4 | grounding F1 | wall s |", "|---" * 9 + "|"]
    for r in runs:
        m = r["metrics"]
        lines.append(f"| {r['fusion']} | {r['seed']} | " + " | ".join(
            f"{m.get(k, float('nan')):.3f}" for k in ("itm_acc", "vqa_acc", "vqa_shape", "i2t_r1", "bleu4", "grounding_f1"))
            + f" | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    results = Path(args.results or tempfile.mkdtemp(prefix="fusion-bench-"))
    results.mkdir(parents=True, exist_ok=True)
    print(f"[fusion] {len(args.fusions)} fusions x {args.seeds} seeds of mmfusion run --config {args.config}; "
          f"results in {results}", flush=True)
    start = time.perf_counter()
    runs = [run(args, f, s, results) for s in range(args.seeds) for f in args.fusions]
    table, lines = summarise(runs, args.fusions), per_run(runs)
    print(f"{table}\n\n{lines}\n[fusion] done in {time.perf_counter() - start:.0f}s", flush=True)
    if args.out:
        sets = " ".join(f"--set {s}" for s in args.overrides)
        Path(args.out).write_text(f"`python bench/fusion.py --config {args.config} --seeds {args.seeds} {sets}`\n\n"
                                  f"{table}\n\n{lines}\n")


if __name__ == "__main__":
    main()
