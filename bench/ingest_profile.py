"""Where one ingest worker's time per photo goes, against the single-process loop of
`bench/ingest.py`, on the same photos, in one process (no Ray).

1. End to end: `stage.process_batch` (the code a Ray cleaning task runs) over the photos, in
   the tasks the driver plans for one CPU, against `bench.ingest.baseline` (the loop), in
   alternating rounds.
2. Step by step: each step of a photo's cleaning, timed over all the photos before the next
   step starts (as `process_batch` runs a group of 32 through each step): the table of ms per
   photo. What the steps do not add up to, of the end-to-end time, is the orchestration
   (rows, groups, guards, sorting) and the caches the steps evict for each other.
3. Two at once: the same work in two processes started together, each over half the photos:
   what 2 CPUs give over 1 on this machine, with no Ray at all.

With `--command`, instead: `mmfusion data ingest` itself, as `bench/ingest.py` runs it, with the
CPU time of each of its processes (sampled every 0.1 s; by role: the driver, Ray's workers,
Ray's own services), against the photos' work in one process (`process_batch`).

    python -m bench.ingest_profile --num 1000 --rounds 3
    python -m bench.ingest_profile --num 4000 --rounds 2 --command
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench.ingest import baseline, ingest_cmd, make_input
from pipelines.config import load_config
from pipelines.ingest import imageclean, stage
from pipelines.ingest.driver import collect_refs, ref_chunks, task_sizes
from pipelines.ingest.fetch import FetchLimits, fetch
from pipelines.ingest.phash import phash_many, thumbnail
from pipelines.ingest.shards import MemberWriter
from pipelines.ingest.sources import detect_format

SETS = ["data.image_size=256", "data.shard_samples=1000"]  # as bench/ingest.py


def ingest_work(refs: list[dict], cfg_dict: dict) -> float:
    """Seconds of `process_batch` over `refs`, in the tasks the driver plans for one CPU."""
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        for chunk in ref_chunks(refs, task_sizes(len(refs), 1)):
            stage.process_batch(chunk, cfg_dict, d, hash_files=True)
        return time.perf_counter() - t


def loop_work(src: Path, spec: imageclean.ImageSpec) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        baseline(src, Path(d) / "loop", spec, 1000)
        return time.perf_counter() - t


def _timed(table: dict, name: str, fn, items: list) -> list:
    t = time.perf_counter()
    out = [fn(x) for x in items]
    table[name] = table.get(name, 0.0) + time.perf_counter() - t
    return out


def _encode(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def steps(refs: list[dict], cfg, spec: imageclean.ImageSpec) -> dict[str, float]:
    """Seconds of each step of the cleaning over all `refs`, a group of `stage.GROUP` through
    each step in turn, as `process_batch` takes them."""
    t: dict[str, float] = {}
    with tempfile.TemporaryFile() as f:
        writer = MemberWriter(f)
        for i in range(0, len(refs), stage.GROUP):
            _group_steps(t, refs[i : i + stage.GROUP], cfg, spec, writer)
        _timed(t, "staging write (tar members)", lambda _: writer.finish(), [0])
    t["accounting row (split, json; its pixel sha256 counted above)"] -= t["pixel sha256"]
    return t


def _group_steps(t: dict[str, float], refs: list[dict], cfg, spec, writer: MemberWriter) -> None:
    cleaned = _timed(t, "text cleaning", lambda r: stage._clean_text(r, cfg), refs)
    limits = FetchLimits.of(cfg)
    data = _timed(t, "file read", lambda c: fetch(c.ref["image"], limits=limits), cleaned)
    _timed(t, "file sha256", lambda d: hashlib.sha256(d).hexdigest(), data)
    imgs = _timed(t, "header + checks", lambda d: imageclean._open(d, spec), data)
    _timed(t, "EXIF size check", lambda im: im.getexif().get(0x0112, 1), imgs)
    imgs = _timed(t, "decode (draft, EXIF transpose)", lambda im: imageclean._decode(im, spec), imgs)
    imgs = _timed(t, "to RGB", imageclean.to_rgb, imgs)
    imgs = _timed(t, "resize", lambda im: imageclean.resize(im, spec), imgs)
    jpegs = _timed(t, "JPEG encode", lambda im: _encode(im, spec.jpeg_quality), imgs)
    thumbs = _timed(t, "phash thumbnail", thumbnail, imgs)
    _timed(t, "pixel sha256", lambda j: hashlib.sha256(j).hexdigest(), jpegs)
    _timed(t, "phash DCT", phash_many, [thumbs])
    for c, im, j, th in zip(cleaned, imgs, jpegs, thumbs, strict=True):
        c.img = imageclean.CleanImage(j, im.width, im.height, "JPEG", th)
    samples = _timed(t, "accounting row (split, json; its pixel sha256 counted above)",
                     lambda c: stage._sample(c, 0, cfg), cleaned)
    _timed(t, "staging write (tar members)", lambda s: writer.add(s[1]), samples)


def _half(refs: list[dict], cfg_dict: dict, queue) -> None:
    queue.put(ingest_work(refs, cfg_dict))


def two_at_once(refs: list[dict], cfg_dict: dict) -> tuple[float, list[float]]:
    """(wall seconds, each process's seconds) of two processes started together, each running
    `ingest_work` over every other Ref."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_half, args=(refs[i::2], cfg_dict, queue)) for i in range(2)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    each = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return time.perf_counter() - t, each


def one_round(rnd: int, src: Path, refs: list[dict], cfg, spec) -> dict[str, float]:
    """Each measurement once, in an order that turns with the round."""
    cfg_dict = cfg.model_dump(mode="json")
    jobs = {"ingest": lambda: ingest_work(refs, cfg_dict), "loop": lambda: loop_work(src, spec),
            "two": lambda: two_at_once(refs, cfg_dict)}
    got: dict = {}
    names = list(jobs)
    for name in names[rnd % 3:] + names[: rnd % 3]:
        got[name] = jobs[name]()
    got["steps"] = steps(refs, cfg, spec)
    return got


def _role(p: psutil.Process, driver: int) -> str:
    if p.pid == driver:
        return "driver (imports, listing, head start, dedup, shards, tokenizer)"
    cmd = " ".join(p.cmdline()[:2])
    if cmd.startswith("ray::") or "default_worker.py" in cmd:  # a worker's title is set once it runs
        return "Ray's workers (imports, cleaning tasks)"
    return "Ray's services (raylet, GCS, agents, monitors)"


def command_cpu(src: Path, out: Path, env: dict) -> tuple[float, dict[str, float]]:
    """(wall seconds, CPU seconds by role) of one `mmfusion data ingest` of `src`."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env}
    t = time.perf_counter()
    proc = subprocess.Popen(ingest_cmd(src, out, SETS), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    root, seen = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                c = p.cpu_times()
                seen[p.pid] = (_role(p, proc.pid), c.user + c.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.1)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"ingest failed ({proc.returncode})")
    roles: dict[str, float] = {}
    for role, cpu in seen.values():
        roles[role] = roles.get(role, 0.0) + cpu
    return wall, roles


def command_rounds(args, src: Path, refs: list[dict], cfg) -> None:
    env = {"RAY_worker_niceness": str(os.nice(0))}  # as bench/ingest.py
    for rnd in range(args.rounds):
        one = ingest_work(refs, cfg.model_dump(mode="json"))
        with tempfile.TemporaryDirectory() as d:
            os.sync()
            wall, roles = command_cpu(src, Path(d) / "out", env)
        print(f"round {rnd}: process_batch in one process {one:.1f}s ({1000 * one / len(refs):.2f} ms per photo); "
              f"the command {wall:.1f}s wall, {sum(roles.values()):.1f} CPU-s:", flush=True)
        for role, cpu in sorted(roles.items()):
            print(f"  {role}: {cpu:.1f} CPU-s")


def report(rounds: list[dict], n: int) -> None:
    med = statistics.median
    ms = {k: [1000 * r[k] / n for r in rounds] for k in ("ingest", "loop")}
    print(f"per photo, one process: loop {med(ms['loop']):.2f} ms ({min(ms['loop']):.2f}-{max(ms['loop']):.2f}), "
          f"process_batch {med(ms['ingest']):.2f} ms ({min(ms['ingest']):.2f}-{max(ms['ingest']):.2f}); "
          f"process_batch / loop: median {med(r['ingest'] / r['loop'] for r in rounds):.3f}x")
    scale = [r["ingest"] / r["two"][0] for r in rounds]
    each = [1000 * e / (n / 2) for r in rounds for e in r["two"][1]]
    print(f"two processes at once: {med(scale):.2f}x one ({min(scale):.2f}-{max(scale):.2f}); each at "
          f"{med(each):.2f} ms per photo ({min(each):.2f}-{max(each):.2f})")
    total = med(r["ingest"] for r in rounds)
    print("\n| step | ms per photo | share of process_batch |\n|---|---|---|")
    names = list(rounds[0]["steps"])
    for name in names:
        v = med(r["steps"][name] for r in rounds)
        print(f"| {name} | {1000 * v / n:.3f} | {100 * v / total:.1f}% |")
    rest = total - sum(med(r["steps"][k] for r in rounds) for k in names)
    print(f"| the rest (orchestration, caches) | {1000 * rest / n:.3f} | {100 * rest / total:.1f}% |")
    print(f"| **process_batch** | **{1000 * total / n:.3f}** | 100% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=1000, help="photos (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--command", action="store_true", help="the CPU of `mmfusion data ingest`'s processes")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mmfusion-bench-ingest"))
    args = ap.parse_args()
    src = make_input(Path(args.work), args.num)
    cfg = load_config("local", SETS).data
    spec = imageclean.ImageSpec.of(cfg)
    refs = collect_refs(str(src), detect_format(str(src)), cfg)
    ingest_work(refs[:64], cfg.model_dump(mode="json"))  # imports, first-call costs
    if args.command:
        return command_rounds(args, src, refs, cfg)
    import webdataset  # noqa: F401 - the loop's tar writer imports torch: not a photo's cost
    rounds = []
    for rnd in range(args.rounds):
        rounds.append(one_round(rnd, src, refs, cfg, spec))
        r = rounds[-1]
        print(f"round {rnd}: loop {1000 * r['loop'] / len(refs):.2f} ms, process_batch {1000 * r['ingest'] / len(refs):.2f} ms "
              f"per photo; two at once {r['ingest'] / r['two'][0]:.2f}x one", flush=True)
    report(rounds, len(refs))


if __name__ == "__main__":
    main()
