"""A URL ingest killed half-way resumes without downloading again what it cleaned; a list that
grew by 10% downloads only the new URLs and makes a new version.

A loopback server counts requests per URL; the killed ingest is a real `mmfusion data ingest`
process (with its own local Ray), SIGKILLed once the server has served half the URLs."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ingest_web_server import WebServer, distinct_jpegs

from pipelines.config import load_config
from pipelines.core import dataset
from pipelines.ingest import ingest
from pipelines.ingest.driver import PIPELINE_VERSION, URL_CACHE_DIR
from pipelines.ingest.imageclean import ImageSpec
from pipelines.ingest.urlcache import UrlCache

pytestmark = pytest.mark.timeout(600)

N = 40
IMAGES = distinct_jpegs(N + N // 10, seed=5)
OVERRIDES = ["data.allow_private_urls=true", "data.dedup_distance=-1", "data.image_size=64"]


def _csv(path: Path, srv: WebServer, n: int) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "url", "caption"])
        for i in range(n):
            w.writerow([f"p{i}", srv.url(f"/img/{i}.jpg"), f"a photo of scene number {i}"])
    return path


def _cached(out: Path, srv: WebServer, n: int = N) -> list[bool]:
    """Whether each URL's cleaned image is in the URL cache."""
    cache = UrlCache(str(out / URL_CACHE_DIR / f"v{PIPELINE_VERSION}"), ImageSpec.of(load_config("debug", OVERRIDES).data))
    return [os.path.exists(cache.path(srv.url(f"/img/{i}.jpg"))) for i in range(n)]


def _hits(srv: WebServer, n: int) -> list[int]:
    return [srv.stats.hits(f"/img/{i}.jpg") for i in range(n)]


def _kill_at_half(cmd: list[str], srv: WebServer, log: Path, out: Path) -> None:
    """Run `cmd` in its own process group; SIGKILL the group once N/2 images were served and
    N/4 cleaned (downloads run ahead of cleaning: that is the point of them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while sum(srv.stats.served.values()) < N // 2 or sum(_cached(out, srv)) < N // 4:
            assert proc.poll() is None, f"the ingest ended before being killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no progress:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:
        _kill_tree(proc.pid)  # the ingest and the Ray it started, workers included, at once
        proc.wait(timeout=60)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            tree.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    return tree


def _kill_tree(root: int) -> None:
    """SIGKILL `root` and every process below it (Ray's workers run in process groups of their
    own, so a group kill would leave them cleaning for a moment after the rest is gone), then
    wait until all are gone."""
    tree, pids, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    for pid in pids[1:]:  # `root` is reaped by the caller
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def test_a_killed_url_ingest_resumes_and_a_grown_list_downloads_only_new_urls(ray_local, tmp_path):
    out = tmp_path / "datasets"
    with WebServer(IMAGES, latency=0.1) as srv:
        source = _csv(tmp_path / "urls.csv", srv, N)
        cmd = [sys.executable, "-c", "from mmfusion.cli import main; main()", "data", "ingest", "--config", "debug",
               "--source", str(source),
               "--out", str(out), "--set", "data.fetch_concurrency=2", *(f"--set={o}" for o in OVERRIDES)]
        _kill_at_half(cmd, srv, tmp_path / "killed.log", out)
        cached = _cached(out, srv)
        before = _hits(srv, N)
        assert N // 4 <= sum(cached) < N, cached  # killed part-way, with part of the work kept

        cfg = load_config("debug", OVERRIDES).data
        vdir = ingest(source, out, cfg)
        after = _hits(srv, N)
        # what was cleaned before the kill is not downloaded again; the rest is, once
        assert [a - b for a, b in zip(after, before, strict=True)] == [0 if c else 1 for c in cached], (before, after, cached)
        report = dataset.read_report(vdir)
        assert report["kept"] == N and dataset.is_complete(vdir), report

        grown = _csv(tmp_path / "urls.csv", srv, N + N // 10)  # 10% more URLs
        again = ingest(grown, out, cfg)
        assert _hits(srv, N) == after  # the old URLs: not one request more
        assert _hits(srv, N + N // 10)[N:] == [1] * (N // 10)  # the new ones: once each
        assert again != vdir and dataset.read_report(again)["kept"] == N + N // 10
        assert json.loads((vdir / dataset.MANIFEST).read_text())["version"] == vdir.name  # the old one untouched
