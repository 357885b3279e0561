"""Cross-modal attention fusion: text tokens attend to image tokens through N layers (the default)."""

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

    def forward(self, x: Tensor, self_mask: Tensor | None, image: Tensor) -> Tensor:
        x = x + self.self_attn(self.ln1(x), mask=self_mask)[0]
        x = x + self.cross_attn(self.ln2(x), context=image)[0]
        return x + self.ff(self.ln3(x))


class CrossAttentionFusion(nn.Module):
    """`(text (B, L, D), text_mask (B, L), image (B, N, D)) -> fused (B, L, D)`."""

    def __init__(self, dim: int, cfg: FusionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, cfg) for _ in range(cfg.num_layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor) -> Tensor:
        # Padding keys are masked out so padded and unpadded inputs fuse identically.
        mask = attention_mask(text_mask)
        for layer in self.layers:
            text = layer(text, mask, image)
        return self.ln(text)
