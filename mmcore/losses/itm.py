"""ITM: binary image-text matching over positives and ITC-sampled hard negatives."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MatchingLoss(nn.Module):
    """Binary cross-entropy of itm_logits `(3B,)` against itm_labels (1 = matched pair)."""

    def forward(self, itm_logits: Tensor, itm_labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(itm_logits, itm_labels.float())
