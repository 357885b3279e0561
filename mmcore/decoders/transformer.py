"""Causal transformer text decoder with cross-attention to image (or fused) tokens and a key/value cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmcore.modules import Attention, FeedForward, attention_mask


@dataclass
class DecoderConfig:
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2
    max_len: int = 64  # longest sequence (BOS + tokens) the position table covers
    dropout: float = 0.0


@dataclass
class DecoderCache:
    """Per-layer self-attention keys/values so far, and the cross-attention keys/values of the memory."""

    self_kv: list = field(default_factory=list)
    cross_kv: list = field(default_factory=list)
    length: int = 0
    key_mask: Tensor | None = None  # (B, length), 1 = a real token; None = no padding so far

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search re-selects which hypotheses continue)."""
        self.self_kv = [(k[index], v[index]) for k, v in self.self_kv]
        self.cross_kv = [(k[index], v[index]) for k, v in self.cross_kv]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[index]


class DecoderLayer(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to the memory, feed-forward."""

    def __init__(self, dim: int, cfg: DecoderConfig):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.dropout)
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.dropout)
        self.ff = FeedForward(dim, cfg.mlp_ratio * dim, cfg.dropout)

    def forward(self, x, self_mask, memory, memory_mask, past=None, cross_kv=None):
        """Returns `(x (B, T, D), self_kv, cross_kv)`; past/cross_kv come from a DecoderCache."""
        h, self_kv = self.self_attn(self.ln1(x), mask=self_mask, past=past)
        x = x + h
        h, cross_kv = self.cross_attn(self.ln2(x), context=memory, mask=memory_mask, kv=cross_kv)
        x = x + h
        return x + self.ff(self.ln3(x)), self_kv, cross_kv


class TextDecoder(nn.Module):
    """`(ids (B, T), memory (B, M, D), memory_mask (B, M)) -> logits (B, T, V)`."""

    def __init__(self, cfg: DecoderConfig, dim: int, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(cfg.max_len, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, cfg) for _ in range(cfg.num_layers))
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(
        self, ids: Tensor, memory: Tensor, memory_mask: Tensor | None = None, cache: DecoderCache | None = None,
        pad_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits `(B, T, V)` for `ids (B, T)`. With a cache, `ids` continue the cached prefix and the
        cache is extended in place (incremental decoding: feed one new token per call).

        `pad_mask (B, T)` (1 = real token) marks padding inside the sequence, e.g. after a short
        question that prefixes its answer: padded tokens are never attended to and take no
        position, so a token's position is the number of real tokens before it."""
        past_len = cache.length if cache is not None else 0
        t = ids.shape[1]
        if past_len + t > self.cfg.max_len:
            raise ValueError(
                f"decoder sequence length {past_len + t} exceeds decoder.max_len {self.cfg.max_len}; "
                "lower max_len or raise decoder.max_len"
            )
        # Query i (absolute position past_len + i) sees keys 0..past_len + i.
        causal = torch.ones(t, past_len + t, dtype=torch.bool, device=ids.device).tril(diagonal=past_len)
        key_mask = _key_mask(cache, pad_mask, ids)
        if key_mask is None:
            pos = torch.arange(past_len, past_len + t, device=ids.device)[None]
            self_mask = causal
        else:
            pos = (key_mask.long().cumsum(1) - 1).clamp_min(0)[:, past_len:]
            self_mask = causal[None, None] & key_mask[:, None, None, :]
        x = self.tok_emb(ids) + self.pos_emb(pos)
        mem_mask = attention_mask(memory_mask)
        for i, layer in enumerate(self.layers):
            past = cache.self_kv[i] if cache is not None and cache.length else None
            cross = cache.cross_kv[i] if cache is not None and cache.length else None
            x, self_kv, cross_kv = layer(x, self_mask, memory, mem_mask, past, cross)
            if cache is not None:
                _store(cache, i, self_kv, cross_kv)
        if cache is not None:
            cache.length, cache.key_mask = past_len + t, key_mask
        return self.lm_head(self.ln(x))


def _key_mask(cache: DecoderCache | None, pad_mask: Tensor | None, ids: Tensor) -> Tensor | None:
    """`(B, past + T)` bool over every key so far, or None when nothing is padded."""
    past = cache.key_mask if cache is not None and cache.length else None
    if pad_mask is None and past is None:
        return None
    new = torch.ones_like(ids, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
    if past is None and cache is not None and cache.length:  # an unpadded cache gains its first padding
        past = torch.ones(ids.shape[0], cache.length, dtype=torch.bool, device=ids.device)
    return new if past is None else torch.cat([past, new], dim=1)


def _store(cache: DecoderCache, i: int, self_kv, cross_kv) -> None:
    if len(cache.self_kv) <= i:
        cache.self_kv.append(self_kv)
        cache.cross_kv.append(cross_kv)
    else:
        cache.self_kv[i] = self_kv
