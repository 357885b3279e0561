"""Does the model hear? `mmfusion run --config configs/audio.yaml`, scored against issue #22's targets.

Runs the audio pipeline exactly as a user does, in a fresh state directory (the spoken set is
synthesised with espeak-ng and ingested, the model with its audio encoder pretrained, fine-tuned,
evaluated and registered from nothing), times it, and reads the test-split report card and its
per-sample file. Spoken VQA is compared with typed VQA on the same questions: the per-sample records
hold both answers to every question that was also asked by voice.

    python bench/audio.py [--config configs/audio.yaml] [--set key=value ...]

Targets (test split, an idle 2-core machine): asr_wer <= 0.15, spoken_vqa_acc within 0.05 of typed
VQA on the same questions, a2t_r1 >= 0.50, wall time <= 900 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.core.records import read_records

WALL_TARGET_S = 900.0
SHOWN = ("t2a_r1", "a2t_r5", "vqa_acc", "i2t_r1", "bleu4", "audio_caption_bleu4")  # reported without a target


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/audio.yaml", help="config file (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep", action="store_true", help="keep the state directory")
    return p.parse_args()


def run_pipeline(args: argparse.Namespace) -> tuple[float, Path, Path]:
    """`mmfusion run` in a fresh state directory: (wall seconds, report card, state directory)."""
    home = Path(tempfile.mkdtemp(prefix="mmfusion-audio-"))
    cmd = [sys.executable, "-m", "mmfusion.cli", "run", "--config", args.config,
           *[f"--set={s}" for s in args.overrides]]
    log = home.parent / f"{home.name}.log"
    print(f"[audio] state {home}, output {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, env={**os.environ, "MMFUSION_HOME": str(home)}, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"the run failed (exit {code}); state kept in {home}, output in {log}")
    cards = sorted(home.glob("evaluations/*/*/report_card.json"), key=lambda p: p.stat().st_mtime)
    if not cards:
        raise SystemExit(f"the run wrote no report card under {home}/evaluations")
    return wall, cards[-1], home


def same_question_vqa(records: list[dict]) -> tuple[float | None, float | None, int]:
    """(typed VQA accuracy, spoken VQA accuracy, questions) over the questions asked both ways."""
    typed = spoken = 0.0
    count = 0
    for r in records:
        by_question = {q["question"]: q["score"] for q in r.get("vqa", [])}
        for q in r.get("spoken_vqa", []):
            if q["question"] in by_question:
                typed, spoken, count = typed + by_question[q["question"]], spoken + q["score"], count + 1
    return (typed / count, spoken / count, count) if count else (None, None, 0)


def table(wall: float, metrics: dict, typed: float | None, spoken: float | None) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    gap = None if typed is None else abs(spoken - typed)
    rows = [("wall_s", "<= 900", f"{wall:.0f}", wall <= WALL_TARGET_S),
            ("asr_wer", "<= 0.15", f(metrics.get("asr_wer")), (metrics.get("asr_wer") or 9) <= 0.15),
            ("spoken_vqa_acc", "typed +- 0.05", f(spoken), gap is not None and gap <= 0.05),
            ("typed VQA, same questions", "", f(typed), None),
            ("a2t_r1", ">= 0.50", f(metrics.get("a2t_r1")), (metrics.get("a2t_r1") or 0) >= 0.5)]
    rows += [(name, "", f(metrics.get(name)), None) for name in SHOWN]
    lines = ["| metric | target | value | met |", "|---|---|---|---|"]
    lines += [f"| {n} | {goal} | {v} | {'' if met is None else 'yes' if met else 'NO'} |" for n, goal, v, met in rows]
    return "\n".join(lines)


def main() -> None:
    args = parse()
    wall, card_path, home = run_pipeline(args)
    card = json.loads(card_path.read_text())
    typed, spoken, asked = same_question_vqa(read_records(card_path.parent / "per_sample.jsonl"))
    print(f"[audio] done in {wall:.0f}s: {card['num_images']} test scenes, {card.get('num_audio')} spoken captions, "
          f"{asked} questions asked both ways")
    for r in read_records(card_path.parent / "per_sample.jsonl")[:3]:
        if r.get("asr"):
            print(f"    heard: {r['asr']['hypothesis']}\n    said:  {r['asr']['reference']}")
    print(table(wall, card["metrics"], typed, spoken))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(home)], check=False)


if __name__ == "__main__":
    main()
