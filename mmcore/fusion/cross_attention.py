"""Cross-modal attention fusion: query tokens (text) attend to context tokens (image, audio, or both
joined by `join_modalities`) through N layers (the default)."""

from __future__ import annotations

from torch import Tensor, nn

from mmcore.fusion.config import FusionConfig
from mmcore.modules import Attention, FeedForward, attention_mask


class CrossAttentionLayer(nn.Module):
    """Pre-LN block: text self-attention, cross-attention to the image, feed-forward."""

    def __init__(self, dim: int, cfg: FusionConfig):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.dropout)
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.dropout)
        self.ff = FeedForward(dim, cfg.mlp_ratio * dim, cfg.dropout)

    def forward(self, x: Tensor, self_mask: Tensor | None, image: Tensor, context_mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.ln1(x), mask=self_mask)[0]
        x = x + self.cross_attn(self.ln2(x), context=image, mask=context_mask)[0]
        return x + self.ff(self.ln3(x))


class CrossAttentionFusion(nn.Module):
    """`(text (B, L, D), text_mask (B, L), context (B, N, D), context_mask (B, N) | None) -> fused
    (B, L, D)`; masked-out context tokens (a modality a sample lacks) are never attended to."""

    def __init__(self, dim: int, cfg: FusionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, cfg) for _ in range(cfg.num_layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, context_mask: Tensor | None = None,
                depth: int | None = None) -> Tensor:
        """`depth`: run only the first `depth` layers (then the final LayerNorm); None runs all."""
        # Padding keys are masked out so padded and unpadded inputs fuse identically.
        mask, context = attention_mask(text_mask), _context_mask(context_mask)
        for layer in self.layers[:depth]:
            text = layer(text, mask, image, context)
        return self.ln(text)


def _context_mask(mask: Tensor | None) -> Tensor | None:
    """Key mask `(B, 1, 1, N)` of the context; a row with no valid token attends to all of them
    (their zero tokens) rather than to nothing, which would give NaN."""
    if mask is None:
        return None
    mask = mask.bool()
    return attention_mask(mask | ~mask.any(dim=1, keepdim=True))
