"""Does the model learn to see? The default `mmfusion run`, scored against issue #16's targets.

Runs `mmfusion run` exactly as a user does (a fresh state directory each round, so the data is
synthesised and ingested, the model pretrained, fine-tuned, evaluated and registered from nothing),
times it, reads the test-split report card it wrote and prints every target metric beside its goal.
With `--rounds N` (different `train.seed`s) it prints each round and the median with its spread.

    python bench/learn.py [--config local] [--rounds 1] [--set key=value ...]

Targets (test split of the synthetic set, the default run, an idle 2-core machine): ITM accuracy
>= 0.90, VQA >= 0.80 and each question type >= 0.70, i2t R@1 >= 0.60, BLEU-4 >= 0.55,
grounding F1 >= 0.85, wall time <= 600 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = {
    "itm_acc": 0.90, "vqa_acc": 0.80, "vqa_count": 0.70, "vqa_colour": 0.70, "vqa_size": 0.70,
    "vqa_shape": 0.70, "vqa_yesno": 0.70, "i2t_r1": 0.60, "bleu4": 0.55, "grounding_f1": 0.85,
}
WALL_TARGET_S = 600.0
SHOWN = ("t2i_r1", "i2t_r5", "cider_d")  # reported without a target


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="local", help="config file or preset (default: local, the default run)")
    p.add_argument("--rounds", type=int, default=1, help="runs with train.seed S..S+N-1 (default 1)")
    p.add_argument("--first-seed", type=int, default=0, metavar="S", help="the first round's train.seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep", action="store_true", help="keep each round's state directory")
    return p.parse_args()


def one_round(args: argparse.Namespace, seed: int, measure: Callable[[str], Any] | None = None) -> dict:
    """Run the pipeline once in a fresh state directory; its wall time and test-split metrics, and
    `measure(checkpoint dir)` of the evaluated checkpoint, read before the directory is removed."""
    home = Path(tempfile.mkdtemp(prefix="mmfusion-learn-"))
    sets = [f"--set={s}" for s in [f"train.seed={seed}", *args.overrides]]
    cmd = [sys.executable, "-m", "mmfusion.cli", "run", "--config", args.config, *sets]
    env = {**__import__("os").environ, "MMFUSION_HOME": str(home)}
    log = home.parent / f"{home.name}.log"
    start = time.perf_counter()
    with open(log, "w") as out:  # the run's own output, to follow with `tail -f`
        print(f"[learn] state {home}, output {log}", flush=True)
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"round with seed {seed} failed (exit {code}); state kept in {home}, output in {log}")
    cards = sorted(home.glob("evaluations/*/*/report_card.json"), key=lambda p: p.stat().st_mtime)
    if not cards:
        raise SystemExit(f"the run wrote no report card under {home}/evaluations")
    card = json.loads(cards[-1].read_text())
    examples = [(e["generated"], e["references"][0]) for e in card.get("examples", [])[:3]]
    config = json.loads((Path(card["checkpoint"]) / "config.json").read_text())
    result = {"wall_s": wall, "metrics": card["metrics"], "examples": examples,
              "itm_calibration": (config.get("extra") or {}).get("itm_calibration"),
              "measured": measure(card["checkpoint"]) if measure else None}
    if not args.keep:
        subprocess.run(["rm", "-rf", str(home)], check=False)
    return result


def table(rounds: list[dict]) -> str:
    names = list(TARGETS) + list(SHOWN)
    lines = ["| metric | target | " + " | ".join(f"round {i + 1}" for i in range(len(rounds)))
             + " | median (min-max) | met |", "|---" * (len(rounds) + 4) + "|"]
    for name in ["wall_s", *names]:
        values = [r["wall_s"] if name == "wall_s" else r["metrics"].get(name) for r in rounds]
        nums = [v for v in values if v is not None]
        med = statistics.median(nums) if nums else None
        goal = WALL_TARGET_S if name == "wall_s" else TARGETS.get(name)
        met = "" if goal is None or med is None else ("yes" if (med <= goal if name == "wall_s" else med >= goal) else "NO")
        cells = " | ".join("n/a" if v is None else f"{v:.3f}" if name != "wall_s" else f"{v:.0f}" for v in values)
        spread = "" if not nums else (f"{med:.0f} ({min(nums):.0f}-{max(nums):.0f})" if name == "wall_s"
                                      else f"{med:.3f} ({min(nums):.3f}-{max(nums):.3f})")
        goal_s = "" if goal is None else (f"<= {goal:.0f}" if name == "wall_s" else f">= {goal:.2f}")
        lines.append(f"| {name} | {goal_s} | {cells} | {spread} | {met} |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    rounds = []
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in args.overrides):
        raise SystemExit("bench/learn.py sets train.seed per round; use --first-seed S instead of --set train.seed=S")
    for i, seed in enumerate(range(args.first_seed, args.first_seed + args.rounds)):
        print(f"[learn] round {i + 1}/{args.rounds}: mmfusion run --config {args.config} (train.seed={seed})",
              flush=True)
        rounds.append(one_round(args, seed))
        print(f"[learn] round {i + 1} done in {rounds[-1]['wall_s']:.0f}s", flush=True)
        for gen, ref in rounds[-1]["examples"]:
            print(f"    model: {gen}\n    truth: {ref}")
    print(table(rounds))


if __name__ == "__main__":
    main()
