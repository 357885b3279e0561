"""A loopback image server that behaves like a remote one: a latency before each reply, HTTP/1.1
keep-alive, and counts of what it saw (requests per path with their times, requests in flight
at once overall and per Host header, connections opened)."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

from ingest_corpus import LocalHTTPServer, QuietHandler, encode, scene


def distinct_jpegs(n: int, seed: int = 11) -> list[bytes]:
    """`n` different photos-like scenes (no two are near duplicates)."""
    return [encode(scene(i, seed)) for i in range(n)]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.inflight = 0
        self.max_inflight = 0
        self.host_inflight: Counter = Counter()
        self.max_per_host: Counter = Counter()
        self.connections = 0
        self.served: Counter = Counter()  # full replies sent, per path

    def hits(self, path: str) -> int:
        with self.lock:
            return len(self.times.get(path, ()))

    def total(self) -> int:
        with self.lock:
            return sum(len(t) for t in self.times.values())


class _Handler(QuietHandler):
    protocol_version = "HTTP/1.1"
    stats: Stats
    images: list[bytes]
    latency = 0.0

    def setup(self):
        super().setup()
        with self.stats.lock:
            self.stats.connections += 1

    def do_GET(self):  # noqa: N802 - http.server's naming
        s, host = self.stats, (self.headers.get("Host") or "").rsplit(":", 1)[0]
        with s.lock:
            s.times[self.path].append(time.monotonic())
            n = len(s.times[self.path])
            s.inflight += 1
            s.host_inflight[host] += 1
            s.max_inflight = max(s.max_inflight, s.inflight)
            s.max_per_host[host] = max(s.max_per_host[host], s.host_inflight[host])
        try:
            time.sleep(self.latency)
            self._route(n)
            with s.lock:
                s.served[self.path] += 1
        finally:
            with s.lock:
                s.inflight -= 1
                s.host_inflight[host] -= 1

    def _route(self, n: int) -> None:
        """/img/<i>.jpg: photo i; /missing: 404; /html: a web page; /text.jpg: not an image;
        /limited<code>/<i>.jpg: <code> (429 or 503) with Retry-After: 1 the first time, then photo i;
        /patience/<i>.jpg: 429 with Retry-After: 3600."""
        parts = self.path.split("?")[0].strip("/").split("/")
        index = int(parts[-1].split(".")[0]) if parts[-1].split(".")[0].isdigit() else 0
        if parts[0] == "img":
            self._send(200, "image/jpeg", self.images[index % len(self.images)])
        elif parts[0] == "html":
            self._send(200, "text/html", b"<html>no image here</html>")
        elif parts[0] == "text.jpg":
            self._send(200, "image/jpeg", b"plain text served as a JPEG\n" * 20)
        elif parts[0].startswith("limited") and n == 1:
            self._send(int(parts[0][len("limited"):]), "text/plain", b"slow down", Retry_After="1")
        elif parts[0].startswith("limited"):
            self._send(200, "image/jpeg", self.images[index % len(self.images)])
        elif parts[0] == "patience":
            self._send(429, "text/plain", b"come back in an hour", Retry_After="3600")
        else:
            self._send(404, "text/plain", b"no such image")


class WebServer(LocalHTTPServer):
    """`with WebServer(images, latency) as srv:` on 127.0.0.1; `srv.url(path, host)` for links
    (host "localhost" reaches the same server under another host name)."""

    def __init__(self, images: list[bytes], latency: float = 0.0):
        self.stats = Stats()
        super().__init__(type("Handler", (_Handler,), {"stats": self.stats, "images": images, "latency": latency}))
