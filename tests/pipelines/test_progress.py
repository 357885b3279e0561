"""The progress helper: a live line on a terminal (a real pseudo-terminal here), plain periodic
lines in a log (a pipe)."""

from __future__ import annotations

import io
import os
import pty

from pipelines.core.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def read_all(fd: int) -> str:
    """Everything written to the terminal so far (a pty hands it over in pieces)."""
    import select

    chunks = []
    while select.select([fd], [], [], 1.0)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_a_terminal_gets_one_line_redrawn_in_place_with_rate_and_time_left():
    master, slave = pty.openpty()
    clock = Clock()
    try:
        with open(slave, "w", closefd=False) as tty_stream:
            with Progress("[eval] inference", total=100, unit="samples", stream=tty_stream, clock=clock) as bar:
                assert bar.tty  # found out from the stream itself
                for _ in range(4):
                    clock.now += 1.0
                    bar.update(10)
        out = read_all(master)
    finally:
        os.close(master)
        os.close(slave)
    frames = [f for f in out.split("\r\x1b[2K") if f]
    assert len(frames) == 5  # four redraws, then the final line
    assert frames[1] == "[eval] inference: 20/100 samples (20%), 10 samples/s, 8s left, 2s elapsed"
    assert frames[-1].rstrip() == "[eval] inference: 40/100 samples (40%), 10 samples/s, 6s left, 4s elapsed"
    assert out.count("\n") == 1  # the line is rewritten, never scrolled, until the end


def test_a_log_gets_a_plain_line_every_interval_and_one_at_the_end():
    read_fd, write_fd = os.pipe()
    clock = Clock()
    with os.fdopen(write_fd, "w") as pipe, Progress("[ingest] cleaned", total=1000, unit="samples", stream=pipe,
                                                   every_s=10, clock=clock) as bar:
        assert not bar.tty
        for _ in range(25):  # 25 s at 20 samples/s
            clock.now += 1.0
            bar.update(20)
    with os.fdopen(read_fd) as reader:
        lines = reader.read().splitlines()
    assert "\r" not in "".join(lines)
    assert lines == [
        "[ingest] cleaned: 200/1000 samples (20%), 20 samples/s, 40s left, 10s elapsed",
        "[ingest] cleaned: 400/1000 samples (40%), 20 samples/s, 30s left, 20s elapsed",
        "[ingest] cleaned: 500/1000 samples (50%), 20 samples/s, 25s left, 25s elapsed",
    ]


def test_unknown_total_shows_count_and_rate_only():
    clock = Clock()
    stream = io.StringIO()
    bar = Progress("[train] steps", unit="steps", stream=stream, tty=False, every_s=5, clock=clock)
    clock.now += 4.0
    bar.update(8)
    bar.close()
    bar.close()
    assert stream.getvalue() == "[train] steps: 8 steps, 2 steps/s, 4s elapsed\n"


def test_ingest_reports_progress_through_it(ray_local, tiny_source, tmp_path, capsys):
    """A real ingest (Ray tasks) ends with the progress line of its cleaning step (stderr is not a
    terminal here: plain lines)."""
    import json

    from pipelines.config import load_config
    from pipelines.ingest import ingest

    total = sum(1 for line in (tiny_source / "samples.jsonl").read_text().splitlines() if line.strip())
    ingest(tiny_source, tmp_path / "datasets", load_config("debug").data)
    err = capsys.readouterr().err
    assert f"[ingest] cleaned: {total}/{total} samples (100%)" in err
    assert "\r" not in err
    assert json.loads((next((tmp_path / "datasets").glob("*/manifest.json"))).read_text())["splits"]



def test_relayed_lines_on_a_terminal_are_one_live_line_and_the_log_gets_every_interval():
    """Lines made elsewhere (rank 0's, relayed by the training driver): redrawn in place on a real
    pseudo-terminal; the log beside it (a Prefect run's API log) gets one every `every_s` and the
    last, so nothing shows twice on the terminal and the log keeps its pace."""
    from pipelines.core.progress import RelayedLines

    master, slave = pty.openpty()
    clock, logged = Clock(), []
    try:
        with open(slave, "w", closefd=False) as tty_stream:
            lines = RelayedLines(logged.append, every_s=10, stream=tty_stream, clock=clock)
            assert lines.tty
            for step in range(1, 26):  # a new line each second
                clock.now += 1.0
                lines.show(f"[train] run: {step}/25 steps")
                lines.show(f"[train] run: {step}/25 steps")  # polled again, unchanged: not redrawn
            lines.close()
            lines.close()
        out = read_all(master)
    finally:
        os.close(master)
        os.close(slave)
    frames = [f for f in out.split("\r\x1b[2K") if f]
    assert [f.rstrip() for f in frames] == [f"[train] run: {s}/25 steps" for s in range(1, 26)]
    assert out.count("\n") == 1
    assert logged == [f"[train] run: {s}/25 steps" for s in (1, 11, 21, 25)]


def test_relayed_lines_in_a_log_are_plain_lines_once_each():
    from pipelines.core.progress import RelayedLines

    read_fd, write_fd = os.pipe()
    logged: list[str] = []
    with os.fdopen(write_fd, "w") as pipe:
        lines = RelayedLines(logged.append, every_s=10, stream=pipe)
        assert not lines.tty
        for text in ("a: 1/3", "a: 1/3", "a: 2/3", "a: 3/3"):
            lines.show(text)
        lines.close()
    with os.fdopen(read_fd) as reader:
        assert reader.read() == "a: 1/3\na: 2/3\na: 3/3\n"  # their maker spaced them: each one, once
    assert logged == ["a: 1/3", "a: 2/3", "a: 3/3"]
