"""Starting and resuming a run: the initial model, the trainer state, what a checkpoint holds
(an mmcore checkpoint plus the resume files of `pipelines.train.state`) and which one to resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.core.checkpoints import NonFiniteError, nonfinite_tensors
from pipelines.train import state as train_state
from pipelines.train.job import TrainJob
from pipelines.train.optim import build_optimizer
from pipelines.train.sharding import checkpoint_activations, load_optimizer_state, shard_model
from pipelines.train.worker import Worker, say, unwrap


def initial_model(job: TrainJob, resume_dir: str | None) -> nn.Module:
    """The resumed weights, else the fine-tuning start (`init_from`), else a fresh seeded model."""
    from mmcore.checkpoint import load_checkpoint
    from mmcore.model import build_model

    start = resume_dir or job.run.init_from
    if start:
        model, _, _ = load_checkpoint(start)
        # A calibrated start (a champion) scores ITM with weights fitted to its head, which this run
        # moves: back to the head alone until the flow's calibrate-itm step fits the new one.
        model.heads.reset_itm_calibration()
        return model.train()
    torch.manual_seed(job.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    return build_model(job.model).train()


def fresh_state(job: TrainJob, worker: Worker) -> dict[str, Any]:
    return {
        "step": 0,
        "total_steps": job.run.total_steps,
        "run_name": job.run.name,
        "task": job.run.task,
        "tasks": job.run.tasks,
        "metrics": {},
        "val_history": [],
        "resumes": [],
        "lineage": job.run.lineage,
        "mlflow_run_id": None,
        "world_size": worker.world_size,
    }


def data_position(job: TrainJob, worker: Worker, step: int) -> dict[str, Any]:
    """Enough to continue the data order: the stream is a function of these numbers."""
    batches = step * job.grad_accum
    return {
        "batches_per_rank": batches,
        "samples_seen": batches * job.train.batch_size * worker.world_size,
        "batch_size": job.train.batch_size,
        "grad_accum": job.grad_accum,
        "world_size": worker.world_size,
        "loader_workers": job.train.loader_workers,
        "seed": job.train.seed,
        "num_train_shards": len(job.data.train_urls),
    }


def restore(job: TrainJob, worker: Worker, resume_dir: str, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Optimiser, scheduler and trainer state from a checkpoint written by `save_train_checkpoint`
    (under either strategy: the files hold the full state; a sharded model keeps its shards)."""
    train_state.optimizer_from_files(optimizer, Path(resume_dir),
                                     load=lambda sd: load_optimizer_state(model, optimizer, sd))
    train_state.scheduler_from_file(scheduler, Path(resume_dir))
    state = train_state.read_trainer_state(resume_dir)
    old = state.get("data_position", {})
    now = data_position(job, worker, state["step"])
    if any(old.get(k) != now[k] for k in ("batch_size", "world_size", "loader_workers", "seed")):
        say(worker, f"warning: data layout changed since the checkpoint ({old} -> {now}); the data "
                    "order continues from the same per-rank position but not the same samples")
    state["resumes"] = [*state.get("resumes", []), {"from_step": state["step"], "time": time.time()}]
    state["world_size"] = worker.world_size
    say(worker, f"resumed from step {state['step']} ({resume_dir})")
    return state


def save_train_checkpoint(directory: Path, model: nn.Module, job: TrainJob, optimizer, scheduler,
                          state: dict[str, Any], gathered: tuple[dict, dict] | None = None) -> None:
    """An mmcore checkpoint plus the resume state (see `pipelines.train.state`). `gathered`: the
    full `(weights, optimiser state)` of a sharded model (`sharding.full_state`); default: the
    unsharded model's own. Refuses, before writing anything, NaN/Inf weights (`NonFiniteError`)."""
    from mmcore.checkpoint import save_checkpoint

    weights, optim = gathered or (unwrap(model).state_dict(), None)
    bad = nonfinite_tensors(weights.items())
    if bad:
        raise NonFiniteError(f"step {state['step']}: NaN/Inf in {', '.join(bad[:5])}; not writing {directory}")
    extra = {"task": job.run.task, "step": state["step"], "run_name": job.run.name, "lineage": job.run.lineage}
    save_checkpoint(directory, unwrap(model), job.data.tokenizer, extra=extra, state=weights)
    train_state.optimizer_to_files(optimizer, directory, optim)
    train_state.scheduler_to_file(scheduler, directory)
    train_state.write_trainer_state(directory, state)


def resume_candidates(job: TrainJob, ray_dir: str | None) -> list[str]:
    """Checkpoint dirs to resume from, newest step first: Ray Train's latest (set after a group
    restart or a same-name re-run) and every complete one in a local run folder. The run folder
    covers a Ray 2.60 race: a checkpoint reported just before a worker dies can be left
    unregistered, so the restarted group (or a re-run) would otherwise redo those steps. The older
    ones are the fallbacks when the newest cannot be loaded (`build_state`)."""
    found = {str(d) for d in (ray_dir, *(train_state.complete_checkpoints(job.run.path) if job.run.path else ()))
             if d}

    def step(d) -> int:
        try:
            return int(train_state.read_trainer_state(d)["step"])
        except (train_state.TrainStateError, KeyError, ValueError, TypeError):
            return -1

    return [d for d in sorted(found, key=step, reverse=True) if step(d) >= 0]


def build_state(job: TrainJob, worker: Worker, resume_dirs: list[str]):
    """(model on device, optimizer, scheduler, trainer state), from the first resumable directory.
    Under `strategy: fsdp` the model comes back sharded (every rank built the same full model:
    the same checkpoint, or the same seed)."""
    from mmcore.checkpoint import CheckpointError

    for resume_dir in [*resume_dirs, None]:
        try:
            model = initial_model(job, resume_dir).to(worker.device)
            if job.train.activation_checkpointing:
                checkpoint_activations(model)
            if job.scaling.strategy == "fsdp":  # before the optimiser, which must hold the shards
                model = shard_model(model, worker.device, job.scaling.fsdp_reduce_dtype)
            optimizer, scheduler = build_optimizer(
                model, job.run.lr, job.train.weight_decay, job.train.warmup_steps, job.run.total_steps,
                job.train.min_lr_ratio,
                fused=worker.device.type == "cuda", lr_scales={"image_encoder.": job.train.image_lr_scale},
            )
            if resume_dir is None:
                return model, optimizer, scheduler, fresh_state(job, worker)
            return model, optimizer, scheduler, restore(job, worker, resume_dir, model, optimizer, scheduler)
        except (CheckpointError, train_state.TrainStateError) as e:
            older = "the previous complete checkpoint" if resume_dirs.index(resume_dir) + 1 < len(resume_dirs) \
                else "a fresh start"
            say(worker, f"warning: cannot resume from {resume_dir}: {e}; falling back to {older}")
    raise AssertionError("unreachable: a fresh start does not read checkpoints")
