"""The NaN/Inf guard: a step whose loss or gradient norm is not finite is skipped on every rank.

`train_step` asks `finite_everywhere(loss, grad_norm)` before the optimiser step. The flag is
reduced over the ranks (MIN), so all of them skip the same steps and their weights and optimiser
states stay identical. A skipped step still advances the step count, the data position and the LR
schedule: the learning rate stays a function of the step number, as on resume. `track_nonfinite`
counts the skipped steps in the trainer state and stops the run after `train.max_nonfinite_steps`
in a row; `check_parameters` stops it before a checkpoint with NaN/Inf weights could be written.
A stopped run leaves `ABORT_FILE` in its run folder, which the driver turns into a `TrainingError`
(raising in the worker instead would make Ray Train restart it, to fail the same way again).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipelines.core.checkpoints import nonfinite_tensors

ABORT_FILE = "aborted.json"


class NonFiniteTrainingError(RuntimeError):
    """The run cannot go on: too many non-finite steps in a row, or NaN/Inf weights."""


def finite_everywhere(*values: Tensor) -> bool:
    """True when every value is finite on every rank (one tiny all-reduce with peers)."""
    flag = torch.stack([v.detach().float().reshape(()) for v in values]).isfinite().all().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def rank_mean(value: Tensor) -> Tensor:
    """The mean of `value` over the ranks: NaN/Inf when it is on any rank (a skipped step's loss
    then reads the same, non-finite, on every rank). Collective: every rank must call it."""
    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def track_nonfinite(state: dict[str, Any], out: dict[str, Tensor], step: int, limit: int) -> None:
    """Count a skipped step (`out["skipped"]` from `train_step`) in `state`; raise
    `NonFiniteTrainingError` at the `limit`-th skipped step in a row (0: never)."""
    if not float(out["skipped"]):
        state["nonfinite_streak"] = 0
        return
    state["nonfinite_steps"] = state.get("nonfinite_steps", 0) + 1
    state["nonfinite_streak"] = streak = state.get("nonfinite_streak", 0) + 1
    if limit > 0 and streak >= limit:
        raise NonFiniteTrainingError(
            f"{streak} steps in a row had a non-finite loss or gradient norm, the last at step {step} "
            f"(loss {float(out['loss']):.4g}, grad_norm {float(out['grad_norm']):.4g}); every one was "
            f"skipped ({state['nonfinite_steps']} in the run). The run diverged: lower train.lr (or "
            "train.finetune_lr), set train.grad_clip, check the data, or raise train.max_nonfinite_steps."
        )


def check_parameters(model: nn.Module, step: int) -> None:
    """Raise `NonFiniteTrainingError` when any rank's weights hold NaN/Inf: never checkpoint them."""
    from pipelines.train.sharding import local_tensor

    # This rank's shards under FSDP: checking whole DTensors would cost a collective per tensor.
    bad = nonfinite_tensors((name, local_tensor(p)) for name, p in model.named_parameters())
    device = next(model.parameters()).device  # NCCL reduces CUDA tensors only
    if finite_everywhere(torch.tensor(float("nan") if bad else 0.0, device=device)):
        return
    raise NonFiniteTrainingError(
        f"step {step}: the model's weights hold NaN/Inf ({', '.join(bad[:3]) or 'on another rank'}); no "
        "checkpoint was written. Lower train.lr or set train.grad_clip, and resume from the last checkpoint."
    )
