"""Where a training process sits and how it computes: rank, device, precision, DDP wrapping."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines.train.job import TrainJob

Batch = dict[str, Any]


@dataclass
class Worker:
    """Where this process sits in the group and how it computes."""

    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None  # bf16 autocast on GPU, None (fp32) on CPU

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def say(worker: Worker, message: str) -> None:
    """Progress on rank 0; Ray forwards worker stdout to the driver's log. (Not `print`: Ray Train
    patches it into a logger that echoes each line twice.)"""
    if worker.is_main:
        sys.stdout.write(f"[train] {message}\n")
        sys.stdout.flush()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def setup_worker(job: TrainJob) -> Worker:
    """Threads, device and precision for this rank."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(int(job.scaling.cpus_per_worker), 1))
    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if job.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = torch.bfloat16 if device.type == "cuda" else None
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device, amp)


def quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every `report` call (the whole metrics dict, per rank) at INFO under a
    logger named after its file path, which `LoggingConfig(log_level=...)` does not reach."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: nothing to quieten
        pass


def speed_up(model: nn.Module, job: TrainJob, device: torch.device) -> nn.Module:
    """The GPU knobs that keep a model's state dict as it is: `channels_last` for a ResNet image
    encoder on CUDA (cuDNN's NHWC convolutions skip a layout transpose per layer), and
    `job.train.compile` (`nn.Module.compile`: in place, the parameter names unchanged, so checkpoints
    are the same; batches are padded to static shapes by `steps.sample_codec`)."""
    image = getattr(model, "image_encoder", None)
    if device.type == "cuda" and image is not None and image.cfg.arch.startswith("resnet"):
        image.to(memory_format=torch.channels_last)
    if job.train.compile:
        model.compile()
    return model


def wrap(model: nn.Module, job: TrainJob, worker: Worker) -> nn.Module:
    """DDP (gloo on CPU, NCCL on GPU: Ray Train set up the process group) when there are peers.
    Under `strategy: fsdp` the model is already sharded (`resume.build_state`): nothing to wrap."""
    if worker.world_size == 1 or job.scaling.strategy == "fsdp":
        return model
    import ray.train.torch

    # Caption / VQA steps leave the ITC/ITM heads unused; pretraining uses every parameter.
    unused = any(t != "pretrain" for t in job.all_tasks)
    return ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": unused}
    )
