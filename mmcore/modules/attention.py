"""Multi-head attention (self or cross, optional key/value cache) and a feed-forward block.

Written out rather than using `nn.MultiheadAttention` because the decoder needs incremental
decoding with a key/value cache, and one small class serves self-attention, cross-attention and
cached decoding alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_mask(key_mask: Tensor | None, causal_len: int | None = None) -> Tensor | None:
    """Boolean attention mask `(B, 1, Lq, Lk)` (True = may attend) for `F.scaled_dot_product_attention`.

    key_mask: `(B, Lk)` with 1/True on real keys and 0 on padding, or None (all keys real).
    causal_len: when given, also forbid query i from seeing key j > i (Lq = Lk = causal_len).
    """
    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[:, None, None, :]
    if causal_len is not None:
        causal = torch.ones(causal_len, causal_len, dtype=torch.bool, device=_device(key_mask)).tril()
        mask = causal[None, None] if mask is None else mask & causal[None, None]
    return mask


def _device(t: Tensor | None) -> torch.device | None:
    return None if t is None else t.device


class Attention(nn.Module):
    """Multi-head attention. Queries come from `x`, keys/values from `context` (cross) or `x` (self).

    With `past=(k, v)` the new keys/values are appended to the cached ones, so a decoder can feed
    one token at a time; the updated `(k, v)` is returned for the next step.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.record: list[Tensor] | None = None  # set by `record_attention`
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: Tensor) -> Tensor:
        """`(B, L, D)` -> `(B, H, L, D/H)`."""
        b, n, d = t.shape
        return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values `(B, H, Lk, D/H)` of `context (B, Lk, D)`; cached once for cross-attention."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x `(B, Lq, D)`; context `(B, Lk, D)` or None; mask broadcastable to `(B, H, Lq, Lk)`.

        `kv` passes precomputed keys/values (cross-attention cache); `past` is a self-attention
        cache to extend. Returns `(out (B, Lq, D), (k, v))`.
        """
        q = self._split(self.q(x))
        if kv is None:
            kv = self.project_kv(x if context is None else context)
            if past is not None:
                kv = (torch.cat([past[0], kv[0]], dim=2), torch.cat([past[1], kv[1]], dim=2))
        k, v = kv
        drop = self.dropout if self.training else 0.0
        if self.record is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            y = self._recorded(q, k, v, mask)
        b, h, n, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * dh)), (k, v)


    def _recorded(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The same attention with its weights written out `(B, H, Lq, Lk)` and kept (no dropout)."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        self.record.append(weights.detach())
        return weights @ v


@contextmanager
def record_attention(modules: dict[str, Attention]) -> Iterator[dict[str, list[Tensor]]]:
    """While active, each named Attention keeps its weights: `{name: [(B, H, Lq, Lk) per call]}`.

    For looking at where a model attends (explanations, diagnostics); slower than the fused kernel.
    """
    records = {name: [] for name in modules}
    for name, module in modules.items():
        module.record = records[name]
    try:
        yield records
    finally:
        for module in modules.values():
            module.record = None


class FeedForward(nn.Module):
    """Position-wise MLP `(B, L, D) -> (B, L, D)`."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
