"""Joining modality token sequences into one fusion context, and pooling it under its mask.

A fusion reads a query sequence (text, or a spoken question's audio tokens) and a context: the
tokens of every other modality present, side by side. `join_modalities` builds that context from
any set of `(tokens (B, N_m, D), mask (B, N_m) or None)` parts; a modality a sample lacks is
masked out (its tokens never seen), never replaced by zeros that would still be attended to.
"""

from __future__ import annotations

import torch
from torch import Tensor


def join_modalities(parts: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
    """`[(tokens (B, N_m, D), mask (B, N_m) | None), ...]` -> `(context (B, sum N_m, D), mask
    (B, sum N_m) bool)`; a None mask means every token of that part is valid."""
    if not parts:
        raise ValueError("join_modalities needs at least one modality")
    tokens = torch.cat([t for t, _ in parts], dim=1)
    masks = [torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m.bool()
             for t, m in parts]
    return tokens, torch.cat(masks, dim=1)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of the valid tokens `(B, N, D)` -> `(B, 1, D)`; zeros for a row with none valid."""
    if mask is None:
        return tokens.mean(dim=1, keepdim=True)
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)
