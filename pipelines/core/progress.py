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


def draw(stream: TextIO, text: str, tty: bool, final: bool = False) -> None:
    """Write one progress line: on a terminal over the last one (`\\r`, erase the line), ended only
    when `final`; elsewhere a plain line."""
    if tty:
        stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
    else:
        stream.write(text + "\n")
    stream.flush()


def is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts `done` of `total` (None: unknown) `unit`s; `initial` of them were done before it was
    made (a resumed run), so the rate and the time left count only what this process did.
    `on_line`: where each line goes instead of the stream (e.g. a file another process shows)."""

    def __init__(self, label: str, total: int | None = None, unit: str = "items", stream: TextIO | None = None,
                 every_s: float = 10.0, refresh_s: float = 0.2, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, initial: int = 0,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.on_line = on_line
        self.tty = (on_line is None and is_terminal(self.stream)) if tty is None else tty
        self.every_s = refresh_s if self.tty else every_s
        self.clock = clock
        self.start = self.last = clock()
        self.initial = self.done = initial
        self.note: Callable[[], str] | None = None
        self.last_line: str | None = None  # the last line written
        self.emitted_at: int | None = None  # `done` when it was written
        self.closed = False

    def rate(self) -> float:
        """Units per second since this object was made."""
        return (self.done - self.initial) / max(self.clock() - self.start, 1e-9)

    def seconds_left(self) -> float | None:
        """At the rate so far; None without a total or before the first unit."""
        rate = self.rate()
        if not self.total or rate <= 0:
            return None
        return max(self.total - self.done, 0) / rate

    def line(self) -> str:
        """`label: 30/120 shards (25%), 2.5 shards/s, 36s left, 12s elapsed` (no total: no share, no
        time left), then `; <note>` when the caller gave one (`update(note=...)`)."""
        elapsed = max(self.clock() - self.start, 1e-9)
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.label}: {count} {self.unit}{share}, {self.rate():.3g} {self.unit}/s"
        if self.total and self.done < self.total:
            left = self.seconds_left()
            text += f", {format_duration(left)} left" if left is not None else ", time left unknown"
        text += f", {format_duration(elapsed)} elapsed"
        return text + (f"; {self.note()}" if self.note is not None else "")

    def update(self, n: int = 1, note: Callable[[], str] | None = None) -> bool:
        """Count `n` more; True when a line was written. `note` (called only when a line is
        written, so it may be costly) adds the caller's own facts to the line."""
        self.done += n
        if note is not None:
            self.note = note
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._emit(final=False)
            return True
        return False

    def close(self) -> None:
        """The last line (the total time); idempotent. In a log, none when the last line written
        already showed the final count."""
        if self.closed:
            return
        self.closed = True
        if self.tty or self.emitted_at != self.done:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        self.last_line, self.emitted_at = self.line(), self.done
        if self.on_line is not None:
            self.on_line(self.last_line)
        else:
            draw(self.stream, self.last_line, self.tty, final)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RelayedLines:
    """Progress lines made elsewhere (another process's `Progress`, read by polling), shown as
    `Progress` shows its own: on a terminal (`stream`, default stderr) each new one redrawn in
    place over the last; in a log each one as a plain line (their maker spaced them).

    `to_log` (e.g. a Prefect run's API log, which must not print to the console itself) gets what
    a log gets; while a terminal shows them live, at most one line every `every_s` seconds, and
    always the last one (`close`)."""

    def __init__(self, to_log: Callable[[str], None] | None = None, every_s: float = 10.0,
                 stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.to_log, self.every_s, self.clock = to_log, every_s, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.shown: str | None = None  # the last line shown
        self.logged: str | None = None  # the last line handed to `to_log`
        self.logged_at = -float("inf")
        self.closed = False

    def show(self, text: str) -> None:
        """A line, unless it is the one shown last."""
        if text == self.shown:
            return
        self.shown = text
        draw(self.stream, text, self.tty)
        if not self.tty or self.clock() - self.logged_at >= self.every_s:
            self._log(text)

    def close(self) -> None:
        """The end: a terminal's live line is ended; the log gets the last line if it has not yet.
        Idempotent."""
        if self.closed or self.shown is None:
            return
        self.closed = True
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        if self.logged != self.shown:
            self._log(self.shown)

    def _log(self, text: str) -> None:
        self.logged, self.logged_at = text, self.clock()
        if self.to_log is not None:
            self.to_log(text)
