"""ITM: binary image-text matching over positives and ITC-sampled hard negatives."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MatchingLoss(nn.Module):
    """Class-balanced binary cross-entropy of itm_logits `(3B,)` against itm_labels (1 = matched).

    The model sees one positive for every two negatives. Plain BCE would learn that prior, putting
    the decision boundary at p = 1/3 instead of at logit 0, so a model that ranks every pair right
    still calls many true pairs "no match". Averaging the loss per class (mean over positives, mean
    over negatives, then their mean) makes logit 0 the balanced boundary that evaluation uses.
    """

    def forward(self, itm_logits: Tensor, itm_labels: Tensor) -> Tensor:
        labels = itm_labels.float()
        per_pair = F.binary_cross_entropy_with_logits(itm_logits, labels, reduction="none")
        positive = labels > 0.5
        parts = [per_pair[mask].mean() for mask in (positive, ~positive) if mask.any()]
        return sum(parts) / len(parts)
