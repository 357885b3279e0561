"""AdamW with linear warm-up and cosine decay, and no weight decay on biases and norms."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices only: decaying biases, norm gains and 1-D embeddings' scales hurts.
    `lr_scales` (`{"image_encoder.": 2.0}`): parameters whose name contains a key get their own
    groups at `lr` times its scale; scales of 1 add no group, so the groups are the usual two."""
    scales = {k: v for k, v in (lr_scales or {}).items() if v != 1.0}
    if scales and lr is None:
        raise ValueError("param_groups: lr_scales need the base lr")
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not param.requires_grad:
            continue
        scale = next((v for k, v in scales.items() if k in name), 1.0)
        groups.setdefault((scale, param.ndim >= 2), []).append(param)
    out = []
    for (scale, decay), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if scale != 1.0:
            group["lr"] = lr * scale
        out.append(group)
    return out


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
    lr_scales: dict[str, float] | None = None,
):
    """(AdamW, LambdaLR). `fused` AdamW on CUDA saves a kernel launch per parameter. `lr_scales`:
    see `param_groups`; the schedule scales every group's lr alike."""
    groups = param_groups(model, weight_decay, lr, lr_scales)
    kwargs = {"fused": True} if fused else {}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_ratio))
    return optimizer, scheduler
