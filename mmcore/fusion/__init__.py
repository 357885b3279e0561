"""Fusion modules, one interface: `fusion(text (B, L, D), text_mask (B, L), image (B, N, D)) -> (B, L, D)`."""

from torch import nn

from mmcore.fusion.concat import ConcatFusion
from mmcore.fusion.config import FUSION_KINDS, FusionConfig
from mmcore.fusion.cross_attention import CrossAttentionFusion
from mmcore.fusion.gated import GatedFusion

_KINDS = {"cross_attention": CrossAttentionFusion, "gated": GatedFusion, "concat": ConcatFusion}


def build_fusion(cfg: FusionConfig, dim: int) -> nn.Module:
    """The fusion module named by `cfg.kind`."""
    if cfg.kind not in _KINDS:
        raise ValueError(f"unknown fusion kind {cfg.kind!r}; use one of {', '.join(FUSION_KINDS)}")
    return _KINDS[cfg.kind](dim, cfg)


__all__ = ["FusionConfig", "CrossAttentionFusion", "GatedFusion", "ConcatFusion", "build_fusion"]
