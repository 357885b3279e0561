"""The per-worker training loop, in small parts: `train_step`, `eval_step`, `evaluate`, the loop.

Each Ray Train worker runs `train_loop_per_worker({"job": TrainJob})`. Every rank runs exactly
`job.total_steps` optimiser steps (the data stream is endless, see `pipelines.train.data`), calls
`ray.train.report` at the same steps (a barrier), and rank 0 writes the checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipelines.core.mlflow import MlflowTracker
from pipelines.train import data as D
from pipelines.train import state as S
from pipelines.train.job import TrainJob
from pipelines.train.optim import build_optimizer
from pipelines.train.throughput import Throughput, mfu, peak_flops, train_flops_per_sample

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


# ----------------------------------------------------------------------------- small parts


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """`(B, E)` on each rank -> `(W*B, E)` everywhere, gradients flowing back to each rank's part.
    Every rank has the same B (fixed-size batches), which all_gather needs."""
    return _GatherWithGrad.apply(x)


def build_losses(job: TrainJob, world_size: int, gather: bool) -> dict[str, nn.Module]:
    """One loss per task; ITC negatives come from all ranks when `gather` (training only)."""
    from mmcore.losses import build_loss

    gather_fn = gather_with_grad if gather and world_size > 1 else None
    return {t: build_loss(t, gather_fn=gather_fn, **job.loss_weights) for t in sorted(set(job.tasks))}


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    micro_batches: list[Batch],
    task: str,
    optimizer: torch.optim.Optimizer,
    scheduler,
    grad_clip: float,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, Tensor]:
    """One optimiser step over `len(micro_batches)` accumulated micro-batches (each `(B, ...)`).

    Gradients are all-reduced once, on the last micro-batch (DDP `no_sync` before it).
    Returns detached scalars: the loss parts (mean over micro-batches), `grad_norm`, `lr`.
    """
    n = len(micro_batches)
    totals: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                losses = loss_fn(model(batch, task))
            (losses["loss"] / n).backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float() / n
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    totals["lr"] = torch.tensor(scheduler.get_last_lr()[0])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals["grad_norm"] = norm.detach().float()
    return totals


@torch.no_grad()
def eval_step(model: nn.Module, loss_fns: dict[str, nn.Module], batch: Batch, autocast) -> tuple[dict, Tensor, Tensor]:
    """Val losses of one batch per task, and its embeddings `image (B, E)`, `text (B, E)` on CPU.

    Runs on the unwrapped model without collectives: ranks may see different batch counts.
    """
    raw = unwrap(model)
    with autocast():
        losses = {f"{task}_loss": fn(raw(batch, task))["loss"].float() for task, fn in loss_fns.items()}
        _, image_emb = raw.encode_image(batch["image"])
        _, text_emb = raw.encode_text(batch["caption_ids"], batch["caption_mask"])
    return losses, image_emb.float().cpu(), text_emb.float().cpu()


def evaluate(model: nn.Module, job: TrainJob, worker: Worker, decode, collate) -> dict[str, float]:
    """Val loss per task and retrieval R@1 over up to `job.val_max_samples` val samples, split across
    ranks and combined; every rank returns the same numbers."""
    from mmcore.metrics import retrieval_recall

    loss_fns = build_losses(job, worker.world_size, gather=False)
    sums: dict[str, float] = {}
    images, texts, count = [], [], 0
    model.eval()
    batches = D.val_batches(job.val_urls, worker.rank, worker.world_size, job.eval_batch_size,
                            job.val_max_samples, decode, collate)
    for batch in batches:
        losses, image_emb, text_emb = eval_step(model, loss_fns, to_device(batch, worker.device), worker.autocast)
        n = len(image_emb)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        images.append(image_emb)
        texts.append(text_emb)
        count += n
    model.train()
    parts = [(sums, count, images, texts)]
    if worker.world_size > 1:
        parts = [None] * worker.world_size
        dist.all_gather_object(parts, (sums, count, images, texts))
    total = sum(p[1] for p in parts)
    if total == 0:
        return {}
    metrics = {f"val_{k}": sum(p[0].get(k, 0.0) for p in parts) / total for k in sums}
    image_emb = torch.cat([e for p in parts for e in p[2]])
    text_emb = torch.cat([e for p in parts for e in p[3]])
    recall = retrieval_recall(image_emb, text_emb, torch.arange(len(text_emb)), ks=(1, 5))
    metrics.update({f"val_{k}": float(v) for k, v in recall.items()})
    metrics["val_samples"] = float(total)
    metrics["val_chance_r1"] = 1.0 / total
    return metrics


# ----------------------------------------------------------------------------- set-up


def setup_worker(job: TrainJob) -> Worker:
    """Threads, device and precision for this rank."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(int(job.cpus_per_worker), 1))
    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
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


def initial_model(job: TrainJob, resume_dir: str | None) -> nn.Module:
    """The resumed weights, else the fine-tuning start (`init_from`), else a fresh seeded model."""
    from mmcore.checkpoint import load_checkpoint
    from mmcore.model import FusionModelConfig, build_model

    start = resume_dir or job.init_from
    if start:
        model, _, _ = load_checkpoint(start)
        return model.train()
    torch.manual_seed(job.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    return build_model(FusionModelConfig.from_dict(job.model_config)).train()


def fresh_state(job: TrainJob, worker: Worker) -> dict[str, Any]:
    return {
        "step": 0,
        "total_steps": job.total_steps,
        "run_name": job.run_name,
        "task": job.task,
        "tasks": job.tasks,
        "metrics": {},
        "val_history": [],
        "resumes": [],
        "lineage": job.lineage,
        "mlflow_run_id": None,
        "world_size": worker.world_size,
    }


def data_position(job: TrainJob, worker: Worker, step: int) -> dict[str, Any]:
    """Enough to continue the data order: the stream is a function of these numbers."""
    batches = step * job.grad_accum
    return {
        "batches_per_rank": batches,
        "samples_seen": batches * job.batch_size * worker.world_size,
        "batch_size": job.batch_size,
        "grad_accum": job.grad_accum,
        "world_size": worker.world_size,
        "loader_workers": job.loader_workers,
        "seed": job.seed,
        "num_train_shards": len(job.train_urls),
    }


def restore(job: TrainJob, worker: Worker, resume_dir: str, optimizer, scheduler) -> dict[str, Any]:
    """Optimiser, scheduler and trainer state from a checkpoint written by `save_train_checkpoint`."""
    S.optimizer_from_files(optimizer, Path(resume_dir))
    S.scheduler_from_file(scheduler, Path(resume_dir))
    state = S.read_trainer_state(resume_dir)
    old = state.get("data_position", {})
    now = data_position(job, worker, state["step"])
    if any(old.get(k) != now[k] for k in ("batch_size", "world_size", "loader_workers", "seed")):
        say(worker, f"warning: data layout changed since the checkpoint ({old} -> {now}); the data "
                    "order continues from the same per-rank position but not the same samples")
    state["resumes"] = [*state.get("resumes", []), {"from_step": state["step"], "time": time.time()}]
    state["world_size"] = worker.world_size
    say(worker, f"resumed from step {state['step']} ({resume_dir})")
    return state


def wrap(model: nn.Module, job: TrainJob, worker: Worker) -> nn.Module:
    """DDP (gloo on CPU, NCCL on GPU: Ray Train set up the process group) when there are peers."""
    if worker.world_size == 1:
        return model
    import ray.train.torch

    # Caption / VQA steps leave the ITC/ITM heads unused; pretraining uses every parameter.
    unused = any(t != "pretrain" for t in job.tasks)
    return ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": unused}
    )


def sample_codec(job: TrainJob, train: bool):
    """(decode(raw, rng) -> sample dict, collate) for this job's tokenizer and input sizes."""
    from mmcore.data import SampleConfig, collate, decode_sample

    cfg = SampleConfig(**job.sample_config)
    pad_id = job.tokenizer.pad_token_id or 0

    def decode(raw: dict, rng=None) -> dict:
        return decode_sample(raw, job.tokenizer, cfg, train=train, rng=rng)

    return decode, lambda samples: collate(samples, pad_id=pad_id)


def build_train_loader(job: TrainJob, worker: Worker, start_step: int):
    decode, collate = sample_codec(job, train=True)
    stream = D.StreamConfig(
        urls=tuple(job.train_urls),
        rank=worker.rank,
        world_size=worker.world_size,
        loader_workers=job.loader_workers,
        batch_size=job.batch_size,
        seed=job.seed,
        shuffle_buffer=job.shuffle_buffer,
        start_batch=start_step * job.grad_accum,
    )
    return D.train_loader(stream, decode, collate, pin_memory=worker.device.type == "cuda")


# ----------------------------------------------------------------------------- checkpoints + reports


def save_train_checkpoint(directory: Path, model: nn.Module, job: TrainJob, optimizer, scheduler,
                          state: dict[str, Any]) -> None:
    """An mmcore checkpoint plus the resume state (see `pipelines.train.state`)."""
    from mmcore.checkpoint import save_checkpoint

    extra = {"task": job.task, "step": state["step"], "run_name": job.run_name, "lineage": job.lineage}
    save_checkpoint(directory, unwrap(model), job.tokenizer, extra=extra)
    S.optimizer_to_files(optimizer, directory)
    S.scheduler_to_file(scheduler, directory)
    S.write_trainer_state(directory, state)


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


def seed_step(job: TrainJob, worker: Worker, step: int) -> None:
    """Dropout and ITM negative sampling depend on (seed, rank, step) only, so a resumed run
    draws the same random numbers as an uninterrupted one."""
    torch.manual_seed(D.stable_seed(job.seed, "step", worker.rank, step))


# ----------------------------------------------------------------------------- the loop


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
    if not worker.is_main or not job.mlflow_uri:
        return None
    tracker = MlflowTracker(job.mlflow_uri, job.mlflow_experiment, job.run_name, state.get("mlflow_run_id"),
                            artifact_location=job.mlflow_artifact_location)
    if state.get("mlflow_run_id") is None:  # params are write-once in MLflow: only on a fresh run
        tracker.log_params(job.describe())
        tracker.set_tags({"task": job.task, **{f"lineage.{k}": v for k, v in job.lineage.items()}})
    return tracker


@dataclass
class Run:
    """What the loop's parts share within one worker."""

    job: TrainJob
    worker: Worker
    model: nn.Module  # DDP-wrapped when world_size > 1
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: dict[str, Any]
    tracker: MlflowTracker | None = None
    flops_per_sample: float | None = None


def run_steps(run: Run) -> dict[str, Any]:
    """Train from `state["step"]` to `job.total_steps`: log, validate, checkpoint, report."""
    job, worker, state = run.job, run.worker, run.state
    if state["step"] >= job.total_steps:
        say(worker, f"run {job.run_name} already at step {state['step']}/{job.total_steps}; nothing to do")
        return state
    loader = iter(build_train_loader(job, worker, state["step"]))
    loss_fns = build_losses(job, worker.world_size, gather=True)
    run.tracker = make_tracker(job, worker, state)
    window, meter = Window(), Throughput()
    global_batch = job.batch_size * job.grad_accum * worker.world_size
    window_start, batches_read = state["step"], 0
    meter.start()
    while state["step"] < job.total_steps:
        step = state["step"]
        maybe_fail(job, worker, step)
        task = job.tasks[step % len(job.tasks)]
        micro = [to_device(next(loader), worker.device) for _ in range(job.grad_accum)]
        batches_read += len(micro)
        if run.flops_per_sample is None and worker.is_main:
            run.flops_per_sample = measure_flops(run, micro[0], task)
        seed_step(job, worker, step)  # after measure_flops, which draws random numbers too
        out = train_step(run.model, loss_fns[task], micro, task, run.optimizer, run.scheduler, job.grad_clip,
                         worker.autocast)
        window.add(task, out)
        state["step"] = done = step + 1
        final = done == job.total_steps
        at_eval = (job.eval_every > 0 and done % job.eval_every == 0) or final
        at_ckpt = (job.checkpoint_every > 0 and done % job.checkpoint_every == 0) or final
        if not (done % max(job.log_every, 1) == 0 or at_eval or at_ckpt):
            continue
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)
        meter.stop(global_batch * (done - window_start))
        metrics = {"step": done, **window.reduce(worker), **speed(run, meter)}
        if at_eval:
            metrics.update(validate(run))
        if final:
            state["ranks"] = rank_facts(run, batches_read)
        log_point(run, metrics, at_ckpt, meter)
        window_start = done
        meter.start()
    if run.tracker is not None:
        run.tracker.close()
    return state


def rank_facts(run: Run, batches_read: int) -> list[dict[str, Any]]:
    """Every rank's own count of where it ended: step, batches it read since it (re)started, node."""
    import ray

    mine = {"rank": run.worker.rank, "step": run.state["step"], "batches_read": batches_read,
            "start_step": run.state["step"] - batches_read // run.job.grad_accum,
            "node_id": ray.get_runtime_context().get_node_id()}
    if run.worker.world_size == 1:
        return [mine]
    facts: list = [None] * run.worker.world_size
    dist.all_gather_object(facts, mine)
    return facts


def measure_flops(run: Run, batch: Batch, task: str) -> float:
    """Training FLOPs per sample of this model and batch shape (one extra forward, once)."""
    def forward():
        with run.worker.autocast():
            unwrap(run.model)(batch, task)

    return train_flops_per_sample(forward, run.job.batch_size)


def speed(run: Run, meter: Throughput) -> dict[str, float]:
    """Global samples/s over the window; model TFLOP/s, and MFU where the device's peak is known."""
    rate = meter.window()
    out = {"samples_per_s": rate}
    if run.flops_per_sample:
        out["train_tflops"] = run.flops_per_sample * rate / 1e12
        m = mfu(rate, run.flops_per_sample, peak_flops(run.worker.device), run.worker.world_size)
        if m is not None:
            out["mfu"] = m
    return out


def validate(run: Run) -> dict[str, float]:
    decode, collate = sample_codec(run.job, train=False)
    metrics = evaluate(run.model, run.job, run.worker, decode, collate)
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
    say(worker, f"{job.run_name} step {state['step']}/{job.total_steps} {shown}")
    saved = dict(state)
    save = None
    if at_ckpt:
        def save(d: Path) -> None:
            save_train_checkpoint(d, run.model, job, run.optimizer, run.scheduler, saved)
    report(worker, metrics, save, state["step"])


def resume_candidates(job: TrainJob, ray_dir: str | None) -> list[str]:
    """Checkpoint dirs to resume from, newest step first: Ray Train's latest (set after a group
    restart or a same-name re-run) and the newest complete one in a local run folder. The second
    covers a Ray 2.60 race: a checkpoint reported just before a worker dies can be left
    unregistered, so the restarted group (or a re-run) would otherwise redo those steps."""
    found = {d for d in (ray_dir, S.latest_checkpoint(job.run_path) if job.run_path else None) if d}

    def step(d) -> int:
        try:
            return int(S.read_trainer_state(d)["step"])
        except (S.TrainStateError, KeyError, ValueError):
            return -1

    return [str(d) for d in sorted(found, key=step, reverse=True) if step(d) >= 0]


def build_state(job: TrainJob, worker: Worker, resume_dirs: list[str]):
    """(model on device, optimizer, scheduler, trainer state), from the first resumable directory."""
    from mmcore.checkpoint import CheckpointError

    for resume_dir in [*resume_dirs, None]:
        try:
            model = initial_model(job, resume_dir).to(worker.device)
            optimizer, scheduler = build_optimizer(
                model, job.lr, job.weight_decay, job.warmup_steps, job.total_steps, job.min_lr_ratio,
                fused=worker.device.type == "cuda",
            )
            if resume_dir is None:
                return model, optimizer, scheduler, fresh_state(job, worker)
            return model, optimizer, scheduler, restore(job, worker, resume_dir, optimizer, scheduler)
        except (CheckpointError, S.TrainStateError) as e:
            say(worker, f"warning: cannot resume from {resume_dir} ({e}); trying an older state")
    raise AssertionError("unreachable: a fresh start does not read checkpoints")


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
    say(worker, f"{job.run_name}: task {job.task} ({'+'.join(job.tasks)}), steps {state['step']}->{job.total_steps}, "
                f"{worker.world_size} worker(s) on {worker.device}, batch {job.batch_size}x{job.grad_accum}/rank")
    return run_steps(Run(job, worker, wrap(model, job, worker), optimizer, scheduler, state))
