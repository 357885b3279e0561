"""ITC: symmetric InfoNCE over image/text embeddings with the model's learnable temperature."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GatherFn = Callable[[Tensor], Tensor]


class ContrastiveLoss(nn.Module):
    """`(CE(s I T^T, diag) + CE(s T I^T, diag)) / 2`.

    gather_fn, when given, maps a local `(B, E)` tensor to the concatenation over all ranks
    `(W*B, E)` *with gradients* (the trainer passes e.g. `torch.distributed.nn.all_gather` + cat),
    so negatives come from every rank while this module stays free of distributed code. Each rank
    then computes the same global loss, as in open_clip with `local_loss=False`.
    """

    def __init__(self, gather_fn: GatherFn | None = None):
        super().__init__()
        self.gather_fn = gather_fn

    def forward(self, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
        if self.gather_fn is not None:
            image_emb, text_emb = self.gather_fn(image_emb), self.gather_fn(text_emb)
        logits = logit_scale * image_emb @ text_emb.T  # (N, N), N = global batch
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
