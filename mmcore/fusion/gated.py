"""Gated weighted sum: each text token is mixed with the pooled image by a learnt per-feature gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcore.fusion.config import FusionConfig
from mmcore.fusion.modalities import masked_mean


class GatedFusion(nn.Module):
    """`fused = g * text + (1 - g) * W image_mean`, `g = sigmoid(U [text; W image_mean])`; shapes as
    CrossAttentionFusion: `(B, L, D), (B, L), (B, N, D), context_mask (B, N) | None -> (B, L, D)`;
    the pooled context is the mean of its valid (unmasked) tokens."""

    def __init__(self, dim: int, cfg: FusionConfig):
        super().__init__()
        self.image_proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, context_mask: Tensor | None = None) -> Tensor:
        # Per-token mixing never looks at other text tokens, so the mask is not needed here.
        img = self.image_proj(masked_mean(image, context_mask)).expand_as(text)
        g = torch.sigmoid(self.gate(torch.cat([text, img], dim=-1)))
        return self.ln(g * text + (1 - g) * img)
