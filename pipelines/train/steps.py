"""The small parts of a training step: losses, `train_step`, `eval_step`, validation metrics,
the differentiable all-gather for ITC negatives, and the sample codec and loader of a job."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipelines.train import data
from pipelines.train.guard import finite_everywhere, rank_mean
from pipelines.train.job import TrainJob
from pipelines.train.sharding import is_sharded
from pipelines.train.worker import Batch, Worker, to_device, unwrap


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
    """`(B_r, ...)` on rank r -> `(sum B_r, ...)` everywhere in rank order, gradients flowing back
    to each rank's part. Ranks may hold different row counts (audio retrieval leaves out the samples
    without audio) and different trailing sizes (a batch's padded caption length): every dimension is
    zero-padded at its end to the largest on any rank for the all_gather, and the padding rows are
    dropped again, so per-token tensors and their 0/1 masks gather too."""
    shape = torch.tensor(x.shape, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    largest = torch.stack(shapes).amax(dim=0).tolist()
    pad = [p for have, want in zip(reversed(x.shape), reversed(largest), strict=True) for p in (0, want - have)]
    if any(pad):
        x = torch.nn.functional.pad(x, pad)
    out = _GatherWithGrad.apply(x)
    if len(set(rows)) > 1:
        keep = torch.cat([torch.arange(r * largest[0], r * largest[0] + n) for r, n in enumerate(rows)])
        out = out[keep.to(out.device)]
    return out


def build_losses(job: TrainJob, world_size: int, gather: bool) -> dict[str, nn.Module]:
    """One loss per task; ITC negatives come from all ranks when `gather` (training only)."""
    from mmcore.losses import build_loss

    gather_fn = gather_with_grad if gather and world_size > 1 else None
    return {t: build_loss(t, gather_fn=gather_fn, **job.loss_weights) for t in job.all_tasks}


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

    Gradients are all-reduced once, on the last micro-batch (DDP `no_sync` before it). When the
    loss or the gradient norm is NaN/Inf on any rank, every rank skips the optimiser update
    (`pipelines.train.guard`); the scheduler still steps, so the LR stays a function of the step.
    Returns detached scalars: the loss parts (mean over micro-batches), `grad_norm`, `lr`, and
    `skipped` (1.0 for a skipped step, else 0.0).
    """
    n = len(micro_batches)
    totals: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, i == n - 1):
            with autocast():
                losses = loss_fn(model(batch, task))
            (losses["loss"] / n).backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float() / n
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, already reduced over the shards
        norm = norm.full_tensor()
    totals["lr"] = torch.tensor(scheduler.get_last_lr()[0])
    finite = finite_everywhere(totals["loss"], norm)
    if finite:
        optimizer.step()
    else:  # every rank skips; the reported loss is the ranks' mean, so it is non-finite everywhere
        totals["loss"] = rank_mean(totals["loss"])
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals["grad_norm"] = norm.detach().float()
    totals["skipped"] = torch.tensor(0.0 if finite else 1.0)
    return totals


def gradient_sync(model: nn.Module, sync: bool):
    """Gradients reduced across ranks on the last micro-batch only: DDP's `no_sync` context, or
    FSDP2's `set_requires_gradient_sync` (which then reduce-scatters the accumulated sum)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


@torch.no_grad()
def eval_step(model: nn.Module, loss_fns: dict[str, nn.Module], batch: Batch, autocast) -> tuple[dict, Tensor, Tensor]:
    """Val losses of one batch per task, and its embeddings `image (B, E)`, `text (B, E)` on CPU.

    Runs on the unwrapped model: no gradient collectives. (Under FSDP each forward still gathers
    the shards, so every rank must run the same batches: `validation_metrics`.)
    """
    raw = unwrap(model)
    with autocast():
        losses = {f"{task}_loss": fn(raw(batch, task))["loss"].float() for task, fn in loss_fns.items()}
        _, image_emb = raw.encode_image(batch["image"])
        _, text_emb = raw.encode_text(batch["caption_ids"], batch["caption_mask"])
    return losses, image_emb.float().cpu(), text_emb.float().cpu()


def validation_metrics(model: nn.Module, job: TrainJob, worker: Worker, decode, collate) -> dict[str, float]:
    """Val loss per task and retrieval R@1 over up to `job.train.val_max_samples` val samples, split across
    ranks and combined; every rank returns the same numbers. Under FSDP every rank runs every val
    batch instead (each forward gathers the shards: a collective that all ranks must join the same
    number of times, whatever their share of the val set) and nothing is combined."""
    from mmcore.metrics import retrieval_recall

    sharded = is_sharded(model)
    rank, world = (0, 1) if sharded else (worker.rank, worker.world_size)
    loss_fns = build_losses(job, worker.world_size, gather=False)
    sums: dict[str, float] = {}
    images, texts, count = [], [], 0
    model.eval()
    batches = data.val_batches(job.data.val_urls, rank, world, job.data.eval_batch_size, job.train.val_max_samples,
                               decode, collate)
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
    if world > 1:
        parts = [None] * world
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


def sample_codec(job: TrainJob, train: bool):
    """(decode(raw, rng) -> sample dict, collate) for this job's tokenizer and input sizes. With
    `job.train.compile` every batch is padded to the longest lengths allowed (`pad_static`)."""
    from mmcore.data import collate, decode_sample
    from pipelines.core.audio import decode_audio_members

    cfg = job.data.sample
    pad_id = job.data.tokenizer.pad_token_id or 0
    lengths = {"caption": cfg.max_text_len, "question": cfg.max_text_len, "answer": cfg.max_answer_len}

    def decode(raw: dict, rng=None) -> dict:
        if cfg.audio:
            raw = decode_audio_members(raw, job.model.audio.sample_rate)
        return decode_sample(raw, job.data.tokenizer, cfg, train=train, rng=rng)

    if job.train.compile:
        return decode, lambda samples: pad_static(collate(samples, pad_id, cfg.swap_share), lengths, pad_id)
    return decode, lambda samples: collate(samples, pad_id, cfg.swap_share)


def pad_static(batch: Batch, lengths: dict[str, int], pad_id: int) -> Batch:
    """Pad `<name>_ids` / `<name>_mask` `(B, L)` to `(B, lengths[name])` (pad id, mask 0): one
    shape for every batch, so a compiled model is traced once. Padding never changes the outputs
    (masked; `tests/mmcore/test_model.py`)."""
    out = dict(batch)
    for name, length in lengths.items():
        ids, mask = batch.get(f"{name}_ids"), batch.get(f"{name}_mask")
        if ids is None or ids.shape[1] >= length:
            continue
        extra = length - ids.shape[1]
        out[f"{name}_ids"] = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
        out[f"{name}_mask"] = torch.nn.functional.pad(mask, (0, extra), value=0)
    return out


def build_train_loader(job: TrainJob, worker: Worker, start_step: int):
    decode, collate = sample_codec(job, train=True)
    stream = data.StreamConfig(
        urls=tuple(job.data.train_urls),
        rank=worker.rank,
        world_size=worker.world_size,
        loader_workers=job.train.loader_workers,
        batch_size=job.train.batch_size,
        seed=job.train.seed,
        shuffle_buffer=job.train.shuffle_buffer,
        start_batch=start_step * job.grad_accum,
        easy_batches=job.curriculum_steps * job.grad_accum,
        easy_max_words=job.train.curriculum_max_words,
    )
    return data.train_loader(stream, decode, collate, pin_memory=worker.device.type == "cuda")
