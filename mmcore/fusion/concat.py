"""Concatenation + MLP: each text token is concatenated with the pooled image and passed through an MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcore.fusion.config import FusionConfig
from mmcore.fusion.modalities import masked_mean


class ConcatFusion(nn.Module):
    """`fused = LN(text + MLP([text; image_mean]))`; shapes `(B, L, D), (B, L), (B, N, D),
    context_mask (B, N) | None -> (B, L, D)`; the pooled context is the mean of its valid tokens."""

    def __init__(self, dim: int, cfg: FusionConfig):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, cfg.mlp_ratio * dim), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_ratio * dim, dim),
        )
        self.ln = nn.LayerNorm(dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, context_mask: Tensor | None = None) -> Tensor:
        img = masked_mean(image, context_mask).expand_as(text)
        # The residual keeps the token identity; the MLP adds what the image says about it.
        return self.ln(text + self.mlp(torch.cat([text, img], dim=-1)))
