"""Benchmark: `mmfusion data ingest` against a single-process loop, same input, same run.

The input is real-sized photos: variants of ../shared/data/coco-mini (random crop + flip, longest
side 640, JPEG q90), so every image is distinct. The baseline runs the same decode (the same
functions: JPEG draft scaling, EXIF transpose, RGB conversion), resize, JPEG encode and tar write,
one sample at a time in this process. The ingest runs as a user runs it: the `mmfusion data
ingest` command, so Python's imports and Ray's start-up are in its time.

The machine may be shared, so the two run in paired rounds that alternate which goes first; the
headline is the median of the per-round ratios, with the min-max spread. Every timed run starts
after a `sync`: each run writes ~230 MB of tars, which the kernel would otherwise write back to
disk during the next run, on a core that run needs. Where the ingest's time goes comes from its
own log lines (start-up and listing, cleaning, dedup + shards). Peak memory (PSS summed over the
command's process tree) at 1x and 4x the input is measured in separate runs: reading every
process's smaps costs a good part of a core, which would otherwise be taken from the timed ingest.

`--base DIR` also runs the ingest command of another checkout (e.g. `git worktree add DIR main`)
in every round, in turn with the other two, so that a change is measured before and after in
the same run: its headline is the median of the per-round ratios of the two commands' times.

    python -m bench.ingest --num 4000 --rounds 3      # target: ratio >= 1.7, memory flat within 15%
    python -m bench.ingest --num 4000 --rounds 3 --no-4x --base ../h19-base
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageOps

from pipelines.config import load_config
from pipelines.ingest.imageclean import ImageSpec, _decode, resize, to_rgb

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


# ----------------------------------------------------------------------------- input


def _coco_items() -> list[tuple[Path, list[str]]]:
    items = []
    for ann in sorted((COCO / "annotations").glob("captions_*.json")):
        data = json.loads(ann.read_text())
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        folder = COCO / ann.stem.removeprefix("captions_")
        items += [(folder / im["file_name"], caps.get(im["id"], [])) for im in data["images"]]
    return items


def _variant(args: tuple[int, str, str]) -> None:
    """Copy `i`: a random crop (60-100% of each side), maybe flipped, longest side 640."""
    i, src, dst = args
    rng = np.random.default_rng(i)
    img = Image.open(src).convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img.thumbnail((640, 640)) if max(img.size) > 640 else None
    scale = 640 / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
    img.save(dst, format="JPEG", quality=90)


def make_input(work: Path, num: int) -> Path:
    """`work/photos-<num>/` with samples.jsonl + images (cached between runs)."""
    out = work / f"photos-{num}"
    if (out / "samples.jsonl").is_file():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    base = _coco_items()
    jobs, lines = [], []
    for i in range(num):
        src, caps = base[i % len(base)]
        name = f"images/p{i:06d}.jpg"
        jobs.append((i, str(src), str(out / name)))
        lines.append(json.dumps({"id": f"p{i:06d}", "image": name, "captions": caps}))
    pool = mp.Pool(os.cpu_count())
    pool.map(_variant, jobs, chunksize=32)
    pool.close()
    pool.join()
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return out


# ----------------------------------------------------------------------------- runs


def baseline(src: Path, out: Path, spec: ImageSpec, shard_samples: int) -> int:
    """Single-process: decode, resize, encode, tar write; returns samples written."""
    import webdataset as wds

    out.mkdir(parents=True)
    writer, n = None, 0
    for line in (src / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        img = resize(to_rgb(_decode(Image.open(io.BytesIO((src / rec["image"]).read_bytes())), spec)), spec)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=spec.jpeg_quality)
        if n % shard_samples == 0:
            writer and writer.close()
            writer = wds.TarWriter(str(out / f"shard-{n // shard_samples:06d}.tar"), encoder=False, mtime=0)
        doc = json.dumps({"id": rec["id"], "captions": rec["captions"]})
        writer.write({"__key__": rec["id"], "jpg": buf.getvalue(), "txt": rec["captions"][0].encode(), "json": doc.encode()})
        n += 1
    writer and writer.close()
    return n


class PeakMemory:
    """Peak summed PSS of a process and its descendants (its Ray), sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            total = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)


def timed(cmd: list[str], log: Path, memory: bool = False, env: dict | None = None,
          base: str | None = None) -> tuple[float, int]:
    """(seconds, peak bytes or 0) of one command; exits with its log's tail if it fails. A run
    whose local Ray did not start (Ray waits 30 s for its raylet, which a heavily loaded machine
    can miss) measured nothing: it is run again, twice at most. With `base` (a checkout's folder),
    the command runs that checkout's code: from its folder, with it on PYTHONPATH (the current
    folder comes first on a `python -c` path, and Ray's workers take the driver's path)."""
    for _ in range(2):
        try:
            return _timed(cmd, log, memory, env, base)
        except SystemExit as e:
            if "timed out during startup" not in str(e):
                raise
            print(f"  (Ray did not start in time; {cmd[0]} run again)", flush=True)
    return _timed(cmd, log, memory, env, base)


def _timed(cmd: list[str], log: Path, memory: bool, env: dict | None, base: str | None) -> tuple[float, int]:
    # as tests/conftest.py sets it for a loaded machine (Ray's own 30 s wait for a new node is fixed: see `timed`)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_raylet_start_wait_time_s": "120", **(env or {})}
    if base:
        env["PYTHONPATH"] = base
    with open(log, "wb") as sink:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=base)
        mem = PeakMemory(proc.pid) if memory else None
        try:
            rc = proc.wait(timeout=3600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.perf_counter() - t
    if mem:
        mem.stop.set()
        mem.thread.join()
    if rc != 0:
        raise SystemExit(f"{cmd[0]} failed ({rc}):\n{log.read_text(errors='replace')[-3000:]}")
    return seconds, mem.peak if mem else 0


def ingest_cmd(src: Path, out: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-c", "from mmfusion.cli import main; main()", "data", "ingest", "--config", "local",
           "--source", str(src), "--out", str(out)]
    return cmd + [a for s in sets for a in ("--set", s)]


_PHASES = {"cleaning": re.compile(r"cleaned \d+ inputs in ([\d.]+)s"), "done": re.compile(r"done in ([\d.]+)s")}


def phases(log: Path, wall: float) -> dict[str, float]:
    """Where one ingest's time went, from its log: start-up and exit (the wall time not in `done
    in`: imports, Ray's shutdown, the interpreter's exit, and Ray's start where the command starts
    Ray before `ingest()`, as it did before 2026-12-03), `cleaned ... in` (from the listing on:
    listing, Ray's start where `ingest()` starts it, cleaning), and the rest (dedup, shards,
    tokenizer, report)."""
    text = log.read_text(errors="replace")
    got = {k: float(m.group(1)) for k, rx in _PHASES.items() if (m := rx.search(text))}
    if len(got) < 2:
        return {}
    return {"start-up": wall - got["done"], "listing + Ray + cleaning": got["cleaning"],
            "dedup + shards + report": got["done"] - got["cleaning"]}


def one_round(rnd: int, src: Path, runs: Path, spec: ImageSpec, sets: list[str], env: dict, base: str | None) -> dict:
    """One paired round, each run in turn going first (by the round number): seconds of each, and
    the ingests' phases (`ingest`: this checkout; `base`: the checkout at `base`, when given)."""
    got: dict = {"phases": {}}
    runners = ["baseline", "ingest"] + (["base"] if base else [])
    for who in runners[rnd % len(runners):] + runners[: rnd % len(runners)]:
        os.sync()  # no run pays for the write-back of the one before
        if who == "baseline":
            t = time.perf_counter()
            got["n"] = baseline(src, runs / f"baseline{rnd}", spec, 1000)
            got["baseline"] = time.perf_counter() - t
        else:
            log = runs / f"{who}{rnd}.log"
            got[who], _ = timed(ingest_cmd(src, runs / f"{who}{rnd}", sets), log, env=env,
                                base=base if who == "base" else None)
            got["phases"][who] = phases(log, got[who])
        shutil.rmtree(runs / f"{who}{rnd}", ignore_errors=True)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=4000, help="photos at 1x (default: %(default)s)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mmfusion-bench-ingest"))
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--no-4x", action="store_true", help="skip the 1x / 4x memory runs")
    ap.add_argument("--rounds", type=int, default=3, help="paired, alternating rounds (default: %(default)s)")
    ap.add_argument("--base", metavar="DIR", help="also run the ingest of the checkout at DIR in every round")
    args = ap.parse_args()
    args.base = args.base and os.path.abspath(args.base)
    if not COCO.is_dir():
        raise SystemExit(f"{COCO} not found: the benchmark needs the coco-mini photos")
    work = Path(args.work)
    t = time.perf_counter()
    src1 = make_input(work, args.num)
    print(f"input ready in {time.perf_counter() - t:.0f}s: {src1}; {os.cpu_count()} CPUs", flush=True)
    sets = [f"data.image_size={args.image_size}", "data.shard_samples=1000"]
    cfg = load_config("local", sets).data
    spec = ImageSpec.of(cfg)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    # Ray starts its workers at nice 15 (to keep the raylet responsive); the baseline runs at
    # nice 0. On a machine shared with other jobs that alone would decide the comparison, so
    # both run at the same priority here. Set RAY_worker_niceness yourself to compare otherwise.
    env = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness", str(os.nice(0)))}
    rounds = []
    for rnd in range(args.rounds):
        r = one_round(rnd, src1, runs, spec, sets, env, args.base)
        rounds.append(r)
        for who in ("ingest", "base") if args.base else ("ingest",):
            print(f"  round {rnd}: baseline {r['n'] / r['baseline']:.1f}/s, {who} {args.num / r[who]:.1f}/s "
                  f"({r['baseline'] / r[who]:.2f}x); phases: "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in r["phases"][who].items()), flush=True)
    report(args, rounds)
    if not args.no_4x:
        memory_runs(args, work, runs, sets, env)
    shutil.rmtree(runs, ignore_errors=True)


def report(args, rounds: list[dict]) -> None:
    med = statistics.median
    print(f"baseline (1 process): median {med(r['n'] / r['baseline'] for r in rounds):.1f} samples/s")
    for who in ("ingest", "base") if args.base else ("ingest",):
        ratios = [r["baseline"] / r[who] for r in rounds]
        name = f"base ({args.base})" if who == "base" else "ingest (this checkout)"
        print(f"{name}, start-up included: median {med(args.num / r[who] for r in rounds):.1f} samples/s, "
              f"{med(r[who] for r in rounds):.1f}s; ratio to the baseline: median {med(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}; {len(ratios)} paired rounds; target >= 1.7)")
        names = rounds[0]["phases"][who].keys()
        print("  time, median of rounds: " + ", ".join(f"{k} {med(r['phases'][who][k] for r in rounds):.1f}s" for k in names))
    if args.base:
        speedups = [r["base"] / r["ingest"] for r in rounds]
        print(f"base time / this checkout's time: median {med(speedups):.2f}x "
              f"(min {min(speedups):.2f}, max {max(speedups):.2f})")


def memory_runs(args, work: Path, runs: Path, sets: list[str], env: dict) -> None:
    peaks = {}
    for scale in (1, 4):
        src = make_input(work, scale * args.num)
        secs, peaks[scale] = timed(ingest_cmd(src, runs / f"memory{scale}", sets), runs / f"memory{scale}.log",
                                   memory=True, env=env)
        print(f"peak memory {scale}x ({scale * args.num}): {peaks[scale] / 2**20:.0f} MiB "
              f"({scale * args.num / secs:.1f} samples/s)", flush=True)
        shutil.rmtree(runs / f"memory{scale}", ignore_errors=True)
    print(f"memory growth 1x -> 4x: {100 * (peaks[4] / peaks[1] - 1):+.1f}%  (target within 15%)")


if __name__ == "__main__":
    main()
