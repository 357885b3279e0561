"""Fusion modules, one interface: `fusion(query (B, L, D), query_mask (B, L), context (B, N, D),
context_mask (B, N) | None) -> (B, L, D)`. The query is text (or a spoken question's audio tokens);
the context is the image, the audio, or several modalities joined by `join_modalities`."""

from torch import nn

from mmcore.fusion.concat import ConcatFusion
from mmcore.fusion.config import FUSION_KINDS, FusionConfig
from mmcore.fusion.cross_attention import CrossAttentionFusion
from mmcore.fusion.gated import GatedFusion
from mmcore.fusion.modalities import join_modalities, masked_mean

_KINDS = {"cross_attention": CrossAttentionFusion, "gated": GatedFusion, "concat": ConcatFusion}


def build_fusion(cfg: FusionConfig, dim: int) -> nn.Module:
    """The fusion module named by `cfg.kind`."""
    if cfg.kind not in _KINDS:
        raise ValueError(f"unknown fusion kind {cfg.kind!r}; use one of {', '.join(FUSION_KINDS)}")
    return _KINDS[cfg.kind](dim, cfg)


__all__ = ["FusionConfig", "CrossAttentionFusion", "GatedFusion", "ConcatFusion", "build_fusion", "join_modalities",
           "masked_mean"]
