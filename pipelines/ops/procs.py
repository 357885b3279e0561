"""Processes the stack starts: each in a session (process group) of its own, so that stopping
it reaches its children, and nothing else on the machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service would not start or answer; the message names it, its log and the fix."""


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def spawn(argv: list[str], env: dict[str, str], log: Path, cwd: str | None = None,
          user: str | None = None) -> int:
    """Start `argv` detached in a new session (its pid is its process group id), as `user` when
    given; output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, start_new_session=True, user=user, group=user,
                                extra_groups=[] if user else None)
    return proc.pid


def alive(pid: int | None) -> bool:
    """True while `pid` runs (a zombie counts as ended)."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_with(marker: str) -> list[int]:
    """Every live process whose command line contains `marker` (e.g. a private temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and marker in cmdline(int(entry.name)):
            if alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (what `spawn` started: Ray's actors take process groups
    of their own but stay in it) and the descendants of `sid` (PostgreSQL's children call
    setsid)."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    parents = {pid: _parent(pid) for pid in pids}
    out = {sid} if alive(sid) else set()
    for pid in pids:
        try:
            if os.getsid(pid) == sid:
                out.add(pid)
        except OSError:
            continue
    grew = True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in out and pid not in out}
        out |= new
        grew = bool(new)
    return sorted(p for p in out if alive(p))


def terminate(pgid: int | None, extra: list[int] = (), timeout_s: float = 20.0,
              sig: int = signal.SIGTERM) -> list[int]:
    """Send `sig` to the session (and group) `pgid` that `spawn` started and to the pids in
    `extra`, wait, then SIGKILL what is left. Returns the pids that were asked to stop."""
    targets = set(extra) | (set(session_members(pgid)) if pgid else set())
    if pgid and alive(pgid):
        targets.add(pgid)
    _signal_all(pgid, targets, sig)
    if not wait_until(lambda: not any(alive(p) for p in targets), timeout_s):
        targets |= set(session_members(pgid)) if pgid else set()  # children born meanwhile
        _signal_all(pgid, targets, signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in targets), 10.0)
    return sorted(targets)


def _signal_all(pgid: int | None, pids: set[int], sig: int) -> None:
    if pgid:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    """Poll `check` until it is true (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return True
        except Exception:  # a probe that fails is "not yet"
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
