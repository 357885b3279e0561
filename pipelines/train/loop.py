"""The per-worker training loop: `train_loop_per_worker`, and `run_steps` that it runs.

Each Ray Train worker runs `train_loop_per_worker({"job": TrainJob})`. Every rank runs exactly
`job.run.total_steps` optimiser steps (the data stream is endless, see `pipelines.train.data`), calls
`ray.train.report` at the same steps (a barrier), and rank 0 writes the checkpoints. The parts
live beside it: `worker` (rank, device), `steps` (train/eval steps, losses, loader), `resume`
(initial model, trainer state, checkpoints), `telemetry` (windows, speed, MLflow, the progress
line), `faults`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.core.mlflow import MlflowTracker
from pipelines.core.storage import join, write_json_atomic
from pipelines.train.data import stable_seed
from pipelines.train.faults import maybe_fail, maybe_poison
from pipelines.train.guard import ABORT_FILE, NonFiniteTrainingError, check_parameters, track_nonfinite
from pipelines.train.job import TrainJob
from pipelines.train.resume import build_state, data_position, resume_candidates, save_train_checkpoint
from pipelines.train.sharding import full_state, is_sharded
from pipelines.train.steps import (
    build_losses,
    build_train_loader,
    sample_codec,
    train_step,
    validation_metrics,
)
from pipelines.train.telemetry import TrainProgress, Window, make_tracker, measure_flops, rank_facts, speed
from pipelines.train.throughput import Throughput
from pipelines.train.worker import Worker, say, setup_worker, speed_up, to_device, unwrap, wrap


@dataclass
class Run:
    """What the loop's parts share within one worker."""

    job: TrainJob
    worker: Worker
    model: nn.Module  # DDP-wrapped when world_size > 1, or FSDP-sharded (`scaling.strategy`)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: dict[str, Any]
    tracker: MlflowTracker | None = None
    flops_per_sample: float | None = None


def run_steps(run: Run) -> dict[str, Any]:
    """Train from `state["step"]` to `job.run.total_steps`: log, validate, checkpoint, report.

    A run the NaN/Inf guard stops (`pipelines.train.guard`) returns early on every rank at the
    same step, leaving its reason in the run folder for the driver."""
    job, worker, state = run.job, run.worker, run.state
    if state["step"] >= job.run.total_steps:
        say(worker, f"run {job.run.name} already at step {state['step']}/{job.run.total_steps}; nothing to do")
        return state
    run.tracker = make_tracker(job, worker, state)
    try:
        train_steps(run)
    except NonFiniteTrainingError as e:
        abort(run, str(e))
    finally:
        if run.tracker is not None:
            run.tracker.close()
    return state


def train_steps(run: Run) -> None:
    job, worker, state = run.job, run.worker, run.state
    loader = iter(build_train_loader(job, worker, state["step"]))
    loss_fns = build_losses(job, worker.world_size, gather=True)
    window, meter, progress = Window(), Throughput(), TrainProgress(job, worker, state["step"])
    global_batch = job.train.batch_size * job.grad_accum * worker.world_size
    window_start, batches_read = state["step"], 0
    meter.start()
    while state["step"] < job.run.total_steps:
        step = state["step"]
        maybe_fail(job, worker, step)
        task = job.task_at(step)
        micro = [to_device(next(loader), worker.device) for _ in range(job.grad_accum)]
        batches_read += len(micro)
        if run.flops_per_sample is None and (worker.is_main or is_sharded(run.model)):  # FSDP: a collective
            run.flops_per_sample = measure_flops(run.model, worker, micro[0], task, job.train.batch_size)
        seed_step(job, worker, step)  # after measure_flops, which draws random numbers too
        out = train_step(run.model, maybe_poison(job, worker, step, loss_fns[task]), micro, task, run.optimizer,
                         run.scheduler, job.train.grad_clip, worker.autocast)
        state["step"] = done = step + 1
        progress.step(task, out)
        track_nonfinite(state, out, done, job.train.max_nonfinite_steps)
        if not float(out.pop("skipped")):  # a skipped step's NaN would poison the window's means
            window.add(task, out)
        final = done == job.run.total_steps
        at_eval = (job.train.eval_every > 0 and done % job.train.eval_every == 0) or final
        at_ckpt = (job.train.checkpoint_every > 0 and done % job.train.checkpoint_every == 0) or final
        if not (done % max(job.train.log_every, 1) == 0 or at_eval or at_ckpt):
            continue
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)
        meter.stop(global_batch * (done - window_start))
        metrics = {"step": done, **window.reduce(worker), **speed(meter, worker, run.flops_per_sample),
                   "nonfinite_steps": float(state.get("nonfinite_steps", 0))}
        if at_eval:
            metrics.update(validate(run))
        if final:
            state["ranks"] = rank_facts(job, worker, done, batches_read)
        if at_ckpt:
            check_parameters(unwrap(run.model), done)
        if run.tracker is not None:  # the time left, as a curve in MLflow
            run.tracker.log_metrics(progress.metrics(), step=done)
        log_point(run, metrics, at_ckpt, meter)
        window_start = done
        meter.start()


def abort(run: Run, reason: str) -> None:
    """Stop the run for `reason`: rank 0 logs it and leaves `guard.ABORT_FILE` in the run folder."""
    job, worker, state = run.job, run.worker, run.state
    say(worker, f"{job.run.name} stopped at step {state['step']}: {reason}")
    if run.tracker is not None:
        run.tracker.log_metrics({"nonfinite_steps": float(state.get("nonfinite_steps", 0))}, step=state["step"])
    if worker.is_main and job.run.uri:
        write_json_atomic(join(job.run.uri, ABORT_FILE), {"step": state["step"], "reason": reason})


def validate(run: Run) -> dict[str, float]:
    decode, collate = sample_codec(run.job, train=False)
    metrics = validation_metrics(run.model, run.job, run.worker, decode, collate)
    entry = {"step": run.state["step"], **metrics}
    run.state["val_history"] = [*run.state["val_history"], entry][-50:]
    return metrics


def log_point(run: Run, metrics: dict[str, float], at_ckpt: bool, meter: Throughput) -> None:
    """Record, print and report one log point (with a checkpoint when `at_ckpt`)."""
    job, worker, state = run.job, run.worker, run.state
    state["metrics"] = metrics
    state["history"] = [*state.get("history", []), metrics][-500:]
    state["data_position"] = data_position(job, worker, state["step"])
    state["samples_per_s"] = meter.overall()
    state["time"] = time.time()
    if run.tracker is not None:
        state["mlflow_run_id"] = run.tracker.wait_run_id(timeout=0.0) or state.get("mlflow_run_id")
        run.tracker.log_metrics(metrics, step=state["step"])
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
    say(worker, f"{job.run.name} step {state['step']}/{job.run.total_steps} {shown}")
    saved = dict(state)
    save = None
    if at_ckpt:
        gathered = full_state(run.model, run.optimizer, worker)  # every rank: under FSDP a collective

        def save(d: Path) -> None:
            save_train_checkpoint(d, run.model, job, run.optimizer, run.scheduler, saved, gathered)
    report(worker, metrics, save, state["step"])


def report(worker: Worker, metrics: dict[str, float], save: Callable[[Path], None] | None, step: int) -> None:
    """`ray.train.report` on every rank (a barrier); with `save`, rank 0 attaches a checkpoint."""
    import ray.train

    name = f"checkpoint-step{step:07d}" if save else None
    if not (save and worker.is_main):
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    tmp = Path(tempfile.mkdtemp(prefix="mmfusion-ckpt-"))
    try:
        save(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def seed_step(job: TrainJob, worker: Worker, step: int) -> None:
    """Dropout and ITM negative sampling depend on (seed, rank, step) only, so a resumed run
    draws the same random numbers as an uninterrupted one."""
    torch.manual_seed(stable_seed(job.train.seed, "step", worker.rank, step))


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. `config["job"]` is a TrainJob. Returns the final trainer state."""
    from pipelines.runtime import quiet_loggers

    quiet_loggers()
    job: TrainJob = config["job"]
    worker = setup_worker(job)
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ray_dir:
        model, optimizer, scheduler, state = build_state(job, worker, resume_candidates(job, ray_dir))
    say(worker, f"{job.run.name}: task {job.run.task} ({'+'.join(job.run.tasks)}), steps {state['step']}->{job.run.total_steps}, "
                f"{worker.world_size} worker(s) on {worker.device}, batch {job.train.batch_size}x{job.grad_accum}/rank")
    model = wrap(speed_up(model, job, worker.device), job, worker)
    return run_steps(Run(job, worker, model, optimizer, scheduler, state))
