"""Many downloads in flight inside one ingest worker, bounded three ways.

Web images take a round trip or more each (50-500 ms), and a CPU decodes one in a few ms: one
download at a time leaves the CPU idle almost all the time. `Downloads` keeps up to
`concurrency` of them in flight on threads (urllib3 reuses each host's connections, see
`fetch.py`), at most `per_host` to any one host (a polite crawler; a host's own limits answer
429 with a Retry-After, which `fetch` honours), and starts no new one while the bytes downloaded
and not yet taken by the caller reach `buffer_bytes`. What the caller holds at any time is then
at most `buffer_bytes` plus the downloads in flight (each at most `data.max_image_bytes`),
whatever the latency.

Results come back in the order the downloads finish, so one slow or dead host never holds up
the decoding of the others: the caller decodes and cleans what has arrived while the rest is
still on its way.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipelines.config import DataConfig


@dataclass(frozen=True)
class DownloadLimits:
    concurrency: int = 32  # downloads in flight in one worker
    per_host: int = 8  # of which at most this many to one host
    buffer_bytes: int = 64 << 20  # downloaded, not yet taken: no new download starts above this

    @classmethod
    def of(cls, cfg: DataConfig) -> DownloadLimits:
        return cls(cfg.fetch_concurrency, cfg.fetch_per_host, cfg.fetch_buffer_bytes)


class Downloads:
    """`fetch(item)` for each of `items` on a thread pool; iterate for (item, bytes or the
    exception it raised) in completion order. Use as a context manager: leaving it early cancels
    the downloads not started yet and waits for none of the others.

    With `claim`, each download starts only once `claim(item)` says yes; at the first no, none
    of the items not started yet will be (the driver's head start hands them to Ray, see
    `driver._HeadStart`), and iterating ends with the downloads already started."""

    def __init__(self, items: list, host: Callable[[Any], str], fetch: Callable[[Any], bytes],
                 limits: DownloadLimits, claim: Callable[[Any], bool] | None = None):
        self.limits, self.fetch, self.total, self.claim = limits, fetch, len(items), claim
        self.queues: dict[str, deque] = {}
        for item in items:
            self.queues.setdefault(host(item), deque()).append(item)
        self.ready = deque(self.queues)  # hosts with queued items and a free slot, round robin
        self.in_ready = set(self.queues)
        self.per_host: Counter = Counter()
        self.running = self.held = self.taken = 0
        self.done: deque = deque()
        self.cond = threading.Condition()
        self.pool = ThreadPoolExecutor(max(1, min(limits.concurrency, len(items))), "download")
        self.closed = False

    def __enter__(self) -> Downloads:
        with self.cond:
            self._launch()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.closed = True
            self.queues.clear()
            self.ready.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _launch(self) -> None:
        """Start downloads while a slot, a host slot and buffer room are free (lock held)."""
        lim = self.limits
        while (not self.closed and self.ready and self.running < lim.concurrency
               and self.held < lim.buffer_bytes):
            host = self.ready.popleft()
            item = self.queues[host].popleft()
            if self.claim is not None and not self.claim(item):
                self.total = self.taken + self.running + len(self.done)  # what was started
                self.queues.clear()
                self.ready.clear()
                return
            self.per_host[host] += 1
            self.running += 1
            if self.queues[host] and self.per_host[host] < lim.per_host:
                self.ready.append(host)
            else:
                self.in_ready.discard(host)
            self.pool.submit(self._run, host, item)

    def _run(self, host: str, item: Any) -> None:
        try:
            result: Any = self.fetch(item)
        except Exception as e:  # noqa: BLE001 - handed to the caller with its item
            result = e
        with self.cond:
            self.per_host[host] -= 1
            self.running -= 1
            if self.queues.get(host) and host not in self.in_ready:
                self.ready.append(host)
                self.in_ready.add(host)
            self.done.append((item, result))
            self.held += len(result) if isinstance(result, bytes) else 0
            self._launch()
            self.cond.notify_all()

    def take(self, most: int) -> list[tuple[Any, Any]]:
        """Up to `most` finished downloads: waits for the first, takes what else has arrived."""
        with self.cond:
            while not self.done:
                self.cond.wait()
            out = [self.done.popleft() for _ in range(min(most, len(self.done)))]
            self.held -= sum(len(r) for _, r in out if isinstance(r, bytes))
            self.taken += len(out)
            self._launch()
            return out

    def batches(self, most: int) -> Iterator[list[tuple[Any, Any]]]:
        """`take(most)` until every item has come back."""
        while self.taken < self.total:
            yield self.take(most)
