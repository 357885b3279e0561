"""What speaking the synthetic set costs: `synthesize(..., audio=True)` against the image-only set.

Each round writes N samples both ways into fresh folders, in alternating order (image-only first in
even rounds), each in its own subprocess, timing wall and CPU (user + system, children included:
espeak-ng runs as subprocesses). Prints seconds per 100 samples for each side and the ratio
spoken / image-only: the median of the paired rounds with the min-max spread. Never best-of.

    python -m bench.synth_audio [--num 100] [--rounds 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "import sys; from pipelines.ingest.synth import synthesize; synthesize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), audio=sys.argv[4] == '1')"


def one(num: int, seed: int, audio: bool, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one synthesis in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, str(out), str(num), str(seed), "1" if audio else "0"],
                   check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    per100 = 100 / args.num
    rows: dict[str, list[tuple[float, float]]] = {"image": [], "spoken": []}
    with tempfile.TemporaryDirectory(prefix="bench-synth-audio-") as tmp:
        for r in range(args.rounds):
            order = ("image", "spoken") if r % 2 == 0 else ("spoken", "image")
            for side in order:
                wall, cpu = one(args.num, args.seed, side == "spoken", Path(tmp) / f"{side}-{r}")
                rows[side].append((wall * per100, cpu * per100))
                print(f"[synth-audio] round {r} {side}: {wall * per100:.2f} s wall, {cpu * per100:.2f} s CPU "
                      f"per 100 samples (load {os.getloadavg()[0]:.1f})", flush=True)
        size = sum(f.stat().st_size for f in (Path(tmp) / "spoken-0" / "audio").iterdir())
    print(f"\n{args.num} samples x {args.rounds} paired rounds, {os.cpu_count()} CPUs; median (min-max)")
    for side in ("image", "spoken"):
        walls, cpus = zip(*rows[side], strict=True)
        print(f"  {side:7s} s per 100 samples: wall {spread(list(walls))}, CPU {spread(list(cpus))}")
    ratio_wall = [s[0] / i[0] for s, i in zip(rows["spoken"], rows["image"], strict=True)]
    ratio_cpu = [s[1] / i[1] for s, i in zip(rows["spoken"], rows["image"], strict=True)]
    print(f"  spoken / image-only: wall {spread(ratio_wall)}x, CPU {spread(ratio_cpu)}x")
    print(f"  audio written: {size / args.num / 1e3:.0f} kB per sample (6 FLAC files)")


if __name__ == "__main__":
    main()
