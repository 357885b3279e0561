"""What a run tells the world: loss windows reduced over ranks, throughput and MFU, per-rank
facts, and the MLflow tracker of rank 0."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipelines.core.mlflow import MlflowTracker
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
