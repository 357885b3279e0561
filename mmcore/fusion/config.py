"""The one config shared by the fusion modules; `kind` picks the module."""

from __future__ import annotations

from dataclasses import dataclass

FUSION_KINDS = ("cross_attention", "gated", "concat")


@dataclass
class FusionConfig:
    kind: str = "cross_attention"  # cross_attention | gated | concat
    num_layers: int = 1  # cross_attention only
    num_heads: int = 4  # cross_attention only
    mlp_ratio: int = 2
    dropout: float = 0.0
