"""AdamW with linear warm-up and cosine decay, and no weight decay on biases and norms."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: decaying biases, norm gains and 1-D embeddings' scales hurts."""
    decay, no_decay = [], []
    for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """lr multiplier at optimiser step `s`: 0 -> 1 linearly over warm-up, then cosine -> min_ratio."""
    warmup = max(int(warmup_steps), 0)
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float,
    fused: bool = False,
):
    """(AdamW, LambdaLR). `fused` AdamW on CUDA saves a kernel launch per parameter."""
    groups = param_groups(model, weight_decay)
    kwargs = {"fused": True} if fused else {}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_ratio))
    return optimizer, scheduler
