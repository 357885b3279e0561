"""Token-level language-model loss with label smoothing (captions and VQA answers)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LanguageModelLoss(nn.Module):
    """Mean cross-entropy over positions whose label is not -100; zero (with a graph) if there are none."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits `(B, T, V)`, labels `(B, T)`."""
        if not (labels != -100).any():
            # e.g. a VQA batch with no question-answer pairs: keep the graph so DDP still syncs.
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
            label_smoothing=self.label_smoothing,
        )
