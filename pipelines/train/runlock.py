"""One live driver per run folder: a second `run_training` with the same run name fails fast.

Ray Train keeps a run's checkpoints and state in `<train_storage>/<run_name>/`, so two drivers
with one run name (two identical retrains: the default name is a hash of task, data and config)
would write into each other's folder. The driver holds an exclusive `flock` on `LOCK_FILE` in
that folder while it runs. The kernel drops the lock when the process ends, however it ends, so
a crashed driver never leaves a stale lock, and re-running a finished or crashed run name resumes
it as before. On object storage there is no lock: give concurrent runs distinct run names (the
retrain flow runs one at a time per model name).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.core.storage import is_remote

LOCK_FILE = ".driver.lock"


class RunInUseError(RuntimeError):
    """Another live process is training this run; the message names it and the fix."""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run folder's lock for the block; `RunInUseError` when a live process holds it."""
    if is_remote(run_dir):
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUseError(
                f"run folder {run_dir} is in use by another live training process ({_holder(path)}). "
                "Wait for it to finish (running the same run name again then resumes or returns its "
                "result), or pass another run name (--run-name) to train separately."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {time.ctime(info['since'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details unreadable"
