"""Progress of a long step (ingest, training, evaluation) for the person watching it.

On a terminal: one live line, redrawn in place (`\\r`) at most every `refresh_s`, with the count,
the rate and the time left. Elsewhere (a log file, a Prefect worker, CI): a plain line every
`every_s` seconds, and one at the end, so a log shows the pace without a line per item.

    with Progress("[eval] inference", total=len(urls), unit="shards") as bar:
        for url in urls:
            ...
            bar.update()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts `done` of `total` (None: unknown) `unit`s since it was made."""

    def __init__(self, label: str, total: int | None = None, unit: str = "items", stream: TextIO | None = None,
                 every_s: float = 10.0, refresh_s: float = 0.2, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.every_s = refresh_s if self.tty else every_s
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0
        self.closed = False

    def line(self) -> str:
        """`label: 30/120 shards (25%), 2.5 shards/s, 36s left` (no total: no share, no time left)."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.label}: {count} {self.unit}{share}, {rate:.3g} {self.unit}/s"
        if self.total and self.done < self.total:
            left = (self.total - self.done) / rate if rate > 0 else None
            text += f", {format_duration(left)} left" if left is not None else ", time left unknown"
        return text + f", {format_duration(elapsed)} elapsed"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._emit(final=False)

    def close(self) -> None:
        """The last line (the total time); idempotent."""
        if not self.closed:
            self.closed = True
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
