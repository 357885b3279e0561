"""Batched greedy and beam-search generation over a TextDecoder, with or without the KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from mmcore.decoders.transformer import DecoderCache, TextDecoder


def _step(decoder, seqs: Tensor, memory, memory_mask, cache: DecoderCache | None) -> Tensor:
    """Next-token logits `(B, V)` given `seqs (B, t)` (BOS first). With a cache only the last token
    is fed; without one the whole prefix is re-run (the slow reference path)."""
    if cache is None:
        return decoder(seqs, memory, memory_mask)[:, -1]
    return decoder(seqs[:, -1:], memory, memory_mask, cache)[:, -1]


@torch.no_grad()
def greedy_search(
    decoder: TextDecoder, memory: Tensor, memory_mask: Tensor | None,
    bos: int, eos: int, pad: int, max_len: int, use_cache: bool = True,
) -> Tensor:
    """Argmax decoding. Returns `(B, T)` tokens after BOS, T <= max_len; EOS kept, PAD after it."""
    b = memory.shape[0]
    seqs = torch.full((b, 1), bos, dtype=torch.long, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    cache = DecoderCache() if use_cache else None
    for _ in range(max_len):
        nxt = _step(decoder, seqs, memory, memory_mask, cache).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    return seqs[:, 1:]


@torch.no_grad()
def beam_search(
    decoder: TextDecoder, memory: Tensor, memory_mask: Tensor | None,
    bos: int, eos: int, pad: int, max_len: int, num_beams: int,
    length_penalty: float = 1.0, use_cache: bool = True,
) -> Tensor:
    """Beam search, all images at once (B*K hypotheses). Finished hypotheses keep their score and
    only extend with PAD; the best of the K is chosen by `score / length**length_penalty`.
    Returns `(B, T)` like greedy_search; with num_beams=1 it is greedy decoding."""
    b, k = memory.shape[0], num_beams
    dev = memory.device
    memory = memory.repeat_interleave(k, dim=0)
    memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(k, dim=0)
    scores = torch.zeros(b, k, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    seqs = torch.full((b * k, 1), bos, dtype=torch.long, device=dev)
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    cache = DecoderCache() if use_cache else None
    for _ in range(max_len):
        logp = torch.log_softmax(_step(decoder, seqs, memory, memory_mask, cache).float(), dim=-1)
        logp[done] = float("-inf")
        logp[done, pad] = 0.0
        vocab = logp.shape[-1]
        top, idx = (scores.reshape(-1, 1) + logp).view(b, k * vocab).topk(k, dim=-1)
        src = (torch.arange(b, device=dev)[:, None] * k + idx // vocab).view(-1)
        tok = (idx % vocab).view(-1)
        seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
        done = done[src] | (tok == eos)
        scores = top
        if cache is not None:
            cache.reorder(src)
        if done.all():
            break
    lengths = (seqs[:, 1:] != pad).sum(-1).clamp(min=1).view(b, k).float()
    best = (scores / lengths**length_penalty).argmax(-1)
    return seqs.view(b, k, -1)[torch.arange(b, device=dev), best, 1:]
