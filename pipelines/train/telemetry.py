"""What a run tells the world: loss windows reduced over ranks, throughput and MFU, per-rank
facts, the MLflow tracker of rank 0, and rank 0's progress line, which the driver relays."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipelines.core.mlflow import MlflowTracker
from pipelines.core.progress import Progress, RelayedLines, is_terminal
from pipelines.core.storage import exists, join, read_json, remove, write_json_atomic
from pipelines.train.job import TrainJob
from pipelines.train.throughput import Throughput, mfu, peak_flops, train_flops_per_sample
from pipelines.train.worker import Batch, Worker, unwrap


class Window:
    """Loss sums between two log points; reduced over ranks when reported."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, task: str, values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            name = key if key in ("lr", "grad_norm") else f"{task}_{key}"
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float().cpu()
            self.counts[name] = self.counts.get(name, 0) + 1

    def reduce(self, worker: Worker) -> dict[str, float]:
        """Means over the window and over ranks (keys are the same on every rank)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys]).to(worker.device)
        if worker.world_size > 1:
            dist.all_reduce(means)
            means /= worker.world_size
        self.sums, self.counts = {}, {}
        return dict(zip(keys, means.cpu().tolist(), strict=True))


def make_tracker(job: TrainJob, worker: Worker, state: dict[str, Any]) -> MlflowTracker | None:
    if not worker.is_main or not job.tracking.uri:
        return None
    tracker = MlflowTracker(job.tracking.uri, job.tracking.experiment, job.run.name, state.get("mlflow_run_id"),
                            artifact_location=job.tracking.artifact_location)
    if state.get("mlflow_run_id") is None:  # params are write-once in MLflow: only on a fresh run
        tracker.log_params(job.describe())
        tracker.set_tags({"task": job.run.task, **{f"lineage.{k}": v for k, v in job.run.lineage.items()}})
    return tracker


def rank_facts(job: TrainJob, worker: Worker, step: int, batches_read: int) -> list[dict[str, Any]]:
    """Every rank's own count of where it ended: step, batches it read since it (re)started, node."""
    import ray

    mine = {"rank": worker.rank, "step": step, "batches_read": batches_read,
            "start_step": step - batches_read // job.grad_accum,
            "node_id": ray.get_runtime_context().get_node_id()}
    if worker.world_size == 1:
        return [mine]
    facts: list = [None] * worker.world_size
    dist.all_gather_object(facts, mine)
    return facts


def measure_flops(model: nn.Module, worker: Worker, batch: Batch, task: str, batch_size: int) -> float:
    """Training FLOPs per sample of this model and batch shape (one extra forward, once)."""
    def forward():
        with worker.autocast():
            unwrap(model)(batch, task)

    return train_flops_per_sample(forward, batch_size)


def speed(meter: Throughput, worker: Worker, flops_per_sample: float | None) -> dict[str, float]:
    """Global samples/s over the window; model TFLOP/s, and MFU where the device's peak is known."""
    rate = meter.window()
    out = {"samples_per_s": rate}
    if flops_per_sample:
        out["train_tflops"] = flops_per_sample * rate / 1e12
        m = mfu(rate, flops_per_sample, peak_flops(worker.device), worker.world_size)
        if m is not None:
            out["mfu"] = m
    return out


PROGRESS_FILE = "progress.json"  # in the run folder: rank 0's last progress line, for the driver
LIVE_EVERY_S = 1.0  # how often rank 0 writes its line while the driver shows it live on a terminal

log = logging.getLogger("pipelines.train")


def progress_every_s(every_s: float, console: TextIO | None = None) -> float:
    """How often rank 0 writes its progress line: `train.progress_every_s`, or every
    `LIVE_EVERY_S` (when that is more often) while the driver's console (stderr) is a terminal,
    where `relay_progress` redraws the line live."""
    return min(every_s, LIVE_EVERY_S) if is_terminal(console or sys.stderr) else every_s


class TrainProgress:
    """Rank 0's progress line, written into the run folder's `PROGRESS_FILE` (never to its
    stdout, which Ray forwards to the driver's console: `relay_progress` shows it there, once):

        [train] NAME: 40/300 steps (13%), 1.9 steps/s, 2m17s left, 21s elapsed; task caption, loss 3.412, 61.2 samples/s

    At most every `run.progress_every_s` seconds (`progress_every_s`), and at the last step. The
    rate is wall-clock time since this worker started (validation and checkpoints included), so
    the time left is what a person waits; samples/s is the global batch (all ranks) times that rate."""

    def __init__(self, job: TrainJob, worker: Worker, start_step: int):
        self.job, self.worker = job, worker
        self.global_batch = job.train.batch_size * job.grad_accum * worker.world_size
        self.bar = Progress(f"[train] {job.run.name}", total=job.run.total_steps, unit="steps",
                            every_s=job.run.progress_every_s, initial=start_step, on_line=self.publish)
        self.task, self.loss, self.loss_tensor = "", math.nan, None

    def step(self, task: str, out: dict[str, Tensor]) -> None:
        """One optimiser step done (`out`: `steps.train_step`'s scalars, rank 0's own loss); may
        write the line (reading the loss off the device only then)."""
        if not self.worker.is_main:
            return
        self.task, self.loss_tensor = task, out["loss"]
        self.bar.update(1, note=self.note)
        if self.bar.done >= self.bar.total:
            self.bar.close()  # writes the last line unless the update just did

    def publish(self, line: str) -> None:
        """A line written: into the run folder for the driver (without one, to stdout)."""
        if self.job.run.uri:
            write_json_atomic(join(self.job.run.uri, PROGRESS_FILE), self.facts())
        else:
            print(line, flush=True)

    def note(self) -> str:
        self.loss = float(self.loss_tensor) if self.loss_tensor is not None else math.nan
        return f"task {self.task}, loss {self.loss:.4g}, {self.samples_per_s():.3g} samples/s"

    def samples_per_s(self) -> float:
        return self.bar.rate() * self.global_batch

    def metrics(self) -> dict[str, float]:
        """For MLflow at a log point: the time left (s) and the share done."""
        left = self.bar.seconds_left()
        out = {"progress": self.bar.done / self.bar.total}
        if left is not None:
            out["eta_s"] = left
        return out

    def facts(self) -> dict[str, Any]:
        return {"line": self.bar.last_line, "step": self.bar.done, "total": self.bar.total, "task": self.task,
                "loss": self.loss, "samples_per_s": self.samples_per_s(), "eta_s": self.bar.seconds_left(),
                "time": time.time()}


@contextlib.contextmanager
def relay_progress(run_uri: str | None, on_line: Callable[[str], None] | None = None, every_s: float = 10.0,
                   console: TextIO | None = None, poll_s: float | None = None) -> Iterator[None]:
    """While the block runs (the driver's `trainer.fit()`), show each new line of rank 0's
    `PROGRESS_FILE` on the console (stderr): on a terminal one line redrawn in place, in a log a
    plain line each (`progress.RelayedLines`). `on_line` (e.g. the Prefect run's API log, which
    must not print to the console itself) gets the lines a log gets: every `every_s` seconds and
    the last. The polling thread runs in a copy of the caller's context, so `on_line` may log to
    the caller's Prefect run. A line from an earlier attempt of the run is removed first."""
    if not run_uri:
        yield
        return
    lines = RelayedLines(on_line, every_s=every_s, stream=console)
    poll_s = poll_s if poll_s is not None else (LIVE_EVERY_S / 2 if lines.tty else 2.0)
    note = join(run_uri, PROGRESS_FILE)
    if exists(note):
        remove(note)

    def poll() -> None:
        try:
            line = read_json(note)["line"] if exists(note) else None
        except (OSError, ValueError, KeyError, TypeError):  # being replaced: the next poll reads it
            return
        if line:
            lines.show(line)

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(poll_s):
            try:
                poll()
            except Exception as e:  # the relay must never break the run it reports on
                log.warning("progress relay: %s", e)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), daemon=True,
                              name="mmfusion-progress-relay")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=poll_s + 10.0)
        poll()
        lines.close()
