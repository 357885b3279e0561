"""Benchmark: `mmfusion data ingest` of a URL list against img2dataset, same photos, same server,
same run.

A loopback HTTP/1.1 server (keep-alive; in this process) serves distinct photos (variants of
../shared/data/coco-mini made by bench/ingest.py's `make_input`, never stored in the repo) and
waits `--latency` ms before each reply, as a remote host does. A share `--fail` of the URLs
fail, in equal parts: 404, a reply that never comes (a timeout), and an HTML page instead of
an image. Both tools get one CSV (`url,caption`), resize the shorter side to 256 px, re-encode
JPEG at quality 90, write WebDataset tars, use a 2 s timeout and no retries, and are timed as a
user sees them: the whole command, start-up included (Ray's for mmfusion, the process pool's for
img2dataset). mmfusion runs with its URL cache off (each round downloads everything).

Rounds are paired and alternate which tool goes first; the headline is the median of the
per-round ratios (mmfusion / img2dataset images/s), with the min-max spread. Peak memory (PSS
summed over the command's process tree) of mmfusion at the highest latency, with 1x and 4x the
URLs, is measured in separate, untimed runs (sampling every process's memory costs CPU).

`--base DIR` also runs mmfusion from another checkout (e.g. `git worktree add DIR main`) in every
round, in turn with the other two, so that a change is measured before and after in the same run.

img2dataset is not a dependency of the project; install it in a virtual environment of its own:

    python -m venv /work/scratch/i2d-venv && /work/scratch/i2d-venv/bin/pip install img2dataset
    python -m bench.ingest_http --num 300 --latency 0 50 200 --rounds 3 \\
        --img2dataset /work/scratch/i2d-venv/bin/img2dataset
"""

from __future__ import annotations

import argparse
import csv
import http.server
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import ingest as ingest_bench
from bench.ingest import COCO, make_input

TIMEOUT_S = 2


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    photos: list[bytes] = []
    latency = 0.0

    def log_message(self, *args):
        pass

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        time.sleep(self.latency)
        kind, _, name = self.path.strip("/").partition("/")
        i = int(name.split(".")[0]) if name.split(".")[0].isdigit() else -1
        if kind == "p" and 0 <= i < len(self.photos):
            self._send(200, "image/jpeg", self.photos[i])
        elif kind == "hang":
            time.sleep(TIMEOUT_S + 1)
            self.close_connection = True
        elif kind == "html":
            self._send(200, "text/html", b"<html><body>an image was here</body></html>")
        else:
            self._send(404, "text/plain", b"not found")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


class PhotoServer:
    def __init__(self, photos: list[bytes]):
        handler = type("Handler", (_Handler,), {"photos": photos})
        self.handler = handler
        self.server = _Server(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set_latency(self, ms: float) -> None:
        self.handler.latency = ms / 1000

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_list(path: Path, srv: PhotoServer, num: int, fail: float, captions: list[str]) -> int:
    """`num` URLs, every 1/fail-th failing (404, timeout, HTML in turn); returns how many work."""
    every = round(1 / fail) if fail > 0 else 0
    good = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in range(num):
            if every and i % every == every - 1:
                url = srv.url(("/missing/{}.jpg", "/hang/{}.jpg", "/html/{}.jpg")[(i // every) % 3].format(i))
            else:
                url, good = srv.url(f"/p/{i}.jpg"), good + 1
            w.writerow([url, captions[i % len(captions)]])
    return good


def mmfusion_cmd(csv_path: Path, out: Path, extra: list[str] = ()) -> list[str]:
    sets = ["data.allow_private_urls=true", "data.image_size=256", "data.resize_mode=shorter", "data.jpeg_quality=90",
            f"data.http_timeout_s={TIMEOUT_S}", "data.http_retries=0", "data.url_cache=false",
            "data.shard_samples=1000", *extra]
    cmd = [sys.executable, "-c", "from mmfusion.cli import main; main()", "data", "ingest", "--config", "local",
           "--source", str(csv_path), "--out", str(out), "--format", "csv"]
    return cmd + [a for s in sets for a in ("--set", s)]


def img2dataset_cmd(exe: str, csv_path: Path, out: Path, threads: int = 16) -> list[str]:
    """Its 2 processes x `threads` threads; its input is cut into shards of `number_sample_per_shard`
    rows, one per process at a time: 4 shards, so that both processes work."""
    rows = sum(1 for _ in open(csv_path)) - 1
    return [exe, "--url_list", str(csv_path), "--input_format", "csv", "--url_col", "url", "--caption_col", "caption",
            "--output_format", "webdataset", "--output_folder", str(out), "--processes_count", "2",
            "--thread_count", str(threads), "--image_size", "256", "--resize_mode", "keep_ratio", "--encode_quality", "90",
            "--timeout", str(TIMEOUT_S), "--retries", "0", "--number_sample_per_shard", str(max(1, -(-rows // 4))),
            "--enable_wandb", "False", "--distributor", "multiprocessing"]


def timed(cmd: list[str], log: Path, memory: bool = False, base: str | None = None) -> tuple[float, int]:
    return ingest_bench.timed(cmd, log, memory, env={"NO_ALBUMENTATIONS_UPDATE": "1"}, base=base)


def kept_img2dataset(out: Path) -> int:
    import json

    return sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))


def kept_mmfusion(out: Path) -> int:
    import json

    reports = list(out.glob("*/report.json"))
    return json.loads(reports[0].read_text())["kept"] if reports else 0


_PACE = {"mmfusion": re.compile(r"then (\d+) samples/s"), "img2dataset": re.compile(r"total .*images per sec: (\d+)")}


def pace(tool: str, log: Path) -> str:
    """The tool's own rate once started (mmfusion: after its first rows came back; img2dataset: its
    reported images/s), from its log; "?" when the log has none."""
    found = _PACE["mmfusion" if tool == "base" else tool].findall(log.read_text(errors="replace"))
    return found[-1] if found else "?"


def one_round(tool: str, args, csv_path: Path, runs: Path, tag: str) -> tuple[float, int]:
    out = runs / f"{tool}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    if tool in ("mmfusion", "base"):  # base: mmfusion from the checkout at --base
        secs, _ = timed(mmfusion_cmd(csv_path, out, args.mmfusion_set), runs / f"{tool}-{tag}.log",
                        base=args.base if tool == "base" else None)
        kept = kept_mmfusion(out)
    else:
        secs, _ = timed(img2dataset_cmd(args.img2dataset, csv_path, out, args.img2dataset_threads),
                        runs / f"{tool}-{tag}.log")
        kept = kept_img2dataset(out)
    shutil.rmtree(out, ignore_errors=True)
    print(f"    {tool}: {secs:.1f}s, {pace(tool, runs / f'{tool}-{tag}.log')}/s once started", flush=True)
    return secs, kept


def bench_latency(args, srv: PhotoServer, csv_path: Path, runs: Path, ms: float) -> dict:
    srv.set_latency(ms)
    tools = ["img2dataset", "mmfusion"] + (["base"] if args.base else [])
    rate: dict[str, list[float]] = {t: [] for t in tools}
    for r in range(args.rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        got = {tool: one_round(tool, args, csv_path, runs, f"{ms:g}ms-{r}") for tool in order}
        for tool in tools:
            rate[tool].append(args.num / got[tool][0])
        print(f"  {ms:g} ms round {r} ({order[0]} first): "
              + ", ".join(f"{t} {rate[t][-1]:.1f}/s ({got[t][1]} kept)" for t in tools)
              + f": mmfusion / img2dataset {rate['mmfusion'][-1] / rate['img2dataset'][-1]:.2f}x", flush=True)
    out = {"ms": ms}
    for tool in tools[1:]:
        ratios = [m / i for m, i in zip(rate[tool], rate["img2dataset"], strict=True)]
        out[tool] = {"rate": statistics.median(rate[tool]), "ratio": statistics.median(ratios),
                     "lo": min(ratios), "hi": max(ratios)}
    out["i2d"] = statistics.median(rate["img2dataset"])
    if args.base:
        speedups = [m / b for m, b in zip(rate["mmfusion"], rate["base"], strict=True)]
        out["speedup"] = (statistics.median(speedups), min(speedups), max(speedups))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=300, help="URLs at 1x (default: %(default)s)")
    ap.add_argument("--latency", type=float, nargs="+", default=[0, 50, 200], help="ms before each reply")
    ap.add_argument("--fail", type=float, default=0.06, help="share of failing URLs (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds per latency (default: %(default)s)")
    ap.add_argument("--img2dataset", default="/work/scratch/i2d-venv/bin/img2dataset",
                    help="the img2dataset command, from its own venv (see above)")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1x / 4x peak-memory runs")
    ap.add_argument("--img2dataset-threads", type=int, default=16,
                    help="img2dataset's threads per process (2 processes; default %(default)s: 32 in flight, as "
                         "mmfusion's 2 workers x data.fetch_per_host 16 to the one host)")
    ap.add_argument("--mmfusion-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further config override for mmfusion's runs, e.g. data.fetch_per_host=32 (the "
                         "benchmark serves every URL from one host, where the per-host cap binds)")
    ap.add_argument("--base", metavar="DIR", help="also run mmfusion from the checkout at DIR in every round")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mmfusion-bench-ingest"))
    args = ap.parse_args()
    args.base = args.base and os.path.abspath(args.base)
    if not COCO.is_dir():
        raise SystemExit(f"{COCO} not found: the benchmark needs the coco-mini photos")
    if not shutil.which(args.img2dataset):
        raise SystemExit(f"{args.img2dataset} not found: install img2dataset in its own venv (see --help)")
    work = Path(args.work)
    src = make_input(work, args.num if args.no_memory else 4 * args.num)
    photos = sorted((src / "images").glob("*.jpg"))
    srv = PhotoServer([p.read_bytes() for p in photos])
    captions = [f"a photo, number {i}" for i in range(97)]
    runs = work / "http-runs"
    runs.mkdir(parents=True, exist_ok=True)
    csv1 = runs / "urls-1x.csv"
    good = write_list(csv1, srv, args.num, args.fail, captions)
    print(f"{args.num} URLs ({good} good, {args.num - good} failing: 404 / timeout / HTML), "
          f"{len(photos)} photos served from {srv.url('/')}; {os.cpu_count()} CPUs"
          + (f"; mmfusion with {' '.join(args.mmfusion_set)}" if args.mmfusion_set else "")
          + f"; img2dataset with 2 x {args.img2dataset_threads} threads", flush=True)
    results = [bench_latency(args, srv, csv1, runs, ms) for ms in args.latency]
    print("\n| latency | code | img2dataset images/s | mmfusion images/s | mmfusion / img2dataset (median, min-max) |")
    print("|---|---|---|---|---|")
    for r in results:
        for tool in ("base", "mmfusion") if args.base else ("mmfusion",):
            m = r[tool]
            code = f"base ({args.base})" if tool == "base" else "this checkout"
            print(f"| {r['ms']:g} ms | {code} | {r['i2d']:.1f} | {m['rate']:.1f} | **{m['ratio']:.2f}x** "
                  f"({m['lo']:.2f}-{m['hi']:.2f}) |")
        if args.base:
            print(f"|  | this checkout / base | | | **{r['speedup'][0]:.2f}x** ({r['speedup'][1]:.2f}-{r['speedup'][2]:.2f}) |")
    if not args.no_memory:
        memory_runs(args, srv, runs, captions)
    srv.close()


def memory_runs(args, srv: PhotoServer, runs: Path, captions: list[str]) -> None:
    ms = max(args.latency)
    srv.set_latency(ms)
    peaks = {}
    for scale in (1, 4):
        csv_path = runs / f"urls-{scale}x.csv"
        write_list(csv_path, srv, scale * args.num, args.fail, captions)
        out = runs / f"memory-{scale}x"
        shutil.rmtree(out, ignore_errors=True)
        secs, peaks[scale] = timed(mmfusion_cmd(csv_path, out), runs / f"memory-{scale}x.log", memory=True)
        print(f"mmfusion at {ms:g} ms, {scale}x ({scale * args.num} URLs): peak {peaks[scale] / 2**20:.0f} MiB, "
              f"{scale * args.num / secs:.1f}/s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"peak memory 1x -> 4x: {100 * (peaks[4] / peaks[1] - 1):+.1f}% (target within 15%)")


if __name__ == "__main__":
    main()
