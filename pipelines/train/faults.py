"""Fault injection for tests: a rank that dies hard, once, at a chosen step; NaN losses."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipelines.train.job import TrainJob
from pipelines.train.worker import Worker


def maybe_fail(job: TrainJob, worker: Worker, step: int) -> None:
    """Test device: the last rank dies (hard, like a lost node) once, at `job.train.fail_at_step`."""
    if job.train.fail_at_step is None or step != job.train.fail_at_step or worker.rank != worker.world_size - 1:
        return
    marker = Path(job.fail_marker or "")
    if not job.fail_marker or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {worker.rank} exited at step {step}\n")
    print(f"[train] rank {worker.rank}: simulated failure at step {step} (fail_at_step)", flush=True)
    os._exit(1)


def maybe_poison(job: TrainJob, worker: Worker, step: int, loss_fn: Callable) -> Callable:
    """Test device: on the last rank, the loss of the steps in `job.train.nonfinite_at_steps` (numbered
    as logged: the first step is 1) becomes NaN, as a diverging run's would."""
    if step + 1 not in job.train.nonfinite_at_steps or worker.rank != worker.world_size - 1:
        return loss_fn

    def poisoned(*args, **kwargs):
        losses = dict(loss_fn(*args, **kwargs))
        losses["loss"] = losses["loss"] * float("nan")
        return losses

    return poisoned
