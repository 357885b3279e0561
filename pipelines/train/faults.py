"""Fault injection for tests: a rank that dies hard, once, at a chosen step."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.train.job import TrainJob
from pipelines.train.worker import Worker


def maybe_fail(job: TrainJob, worker: Worker, step: int) -> None:
    """Test device: the last rank dies (hard, like a lost node) once, at `job.fail_at_step`."""
    if job.fail_at_step is None or step != job.fail_at_step or worker.rank != worker.world_size - 1:
        return
    marker = Path(job.fail_marker or "")
    if not job.fail_marker or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {worker.rank} exited at step {step}\n")
    print(f"[train] rank {worker.rank}: simulated failure at step {step} (fail_at_step)", flush=True)
    os._exit(1)
