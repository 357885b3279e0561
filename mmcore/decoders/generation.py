"""Batched greedy and beam-search generation over a TextDecoder, with or without the KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from mmcore.decoders.transformer import DecoderCache, TextDecoder


def _step(decoder, seqs: Tensor, memory, memory_mask, cache: DecoderCache | None, seq_mask: Tensor | None) -> Tensor:
    """Next-token logits `(B, V)` given `seqs (B, t)` (any prompt, then BOS, then the tokens so far;
    `seq_mask` marks the prompt's padding). With a cache only the new tokens are fed; without one
    the whole sequence is re-run (the slow reference path)."""
    if cache is None or not cache.length:
        padded = {} if seq_mask is None else {"pad_mask": _extend(seq_mask, seqs.shape[1])}
        return decoder(seqs, memory, memory_mask, cache, **padded)[:, -1]
    return decoder(seqs[:, -1:], memory, memory_mask, cache)[:, -1]


def _extend(mask: Tensor, length: int) -> Tensor:
    """A prompt's mask `(B, P)` followed by ones up to `length`."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], length - mask.shape[1])], dim=1)


def _start(bos: int, rows: int, device, prompt: Tensor | None, prompt_mask: Tensor | None):
    """The first tokens `(rows, P + 1)`: the prompt (if any) then BOS, and the prompt's mask."""
    seqs = torch.full((rows, 1), bos, dtype=torch.long, device=device)
    if prompt is None:
        return seqs, None
    mask = torch.ones_like(prompt, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
    return torch.cat([prompt, seqs], dim=1), mask


@torch.no_grad()
def greedy_search(
    decoder: TextDecoder, memory: Tensor, memory_mask: Tensor | None,
    bos: int, eos: int, pad: int, max_len: int, use_cache: bool = True,
    prompt: Tensor | None = None, prompt_mask: Tensor | None = None,
) -> Tensor:
    """Argmax decoding. Returns `(B, T)` tokens after BOS, T <= max_len; EOS kept, PAD after it.
    With `prompt (B, P)` (right-padded, `prompt_mask` 1 on real tokens) the decoder reads the prompt
    before BOS, and only what follows BOS is returned."""
    b = memory.shape[0]
    seqs, seq_mask = _start(bos, b, memory.device, prompt, prompt_mask)
    start = seqs.shape[1]
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    cache = DecoderCache() if use_cache else None
    for _ in range(max_len):
        nxt = _step(decoder, seqs, memory, memory_mask, cache, seq_mask).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    return seqs[:, start:]


@torch.no_grad()
def beam_search(
    decoder: TextDecoder, memory: Tensor, memory_mask: Tensor | None,
    bos: int, eos: int, pad: int, max_len: int, num_beams: int,
    length_penalty: float = 1.0, use_cache: bool = True,
    prompt: Tensor | None = None, prompt_mask: Tensor | None = None,
) -> Tensor:
    """Beam search, all images at once (B*K hypotheses). Finished hypotheses keep their score and
    only extend with PAD; the best of the K is chosen by `score / length**length_penalty`.
    Returns `(B, T)` like greedy_search (a prompt as there); with num_beams=1 it is greedy decoding."""
    b, k = memory.shape[0], num_beams
    dev = memory.device
    memory = memory.repeat_interleave(k, dim=0)
    memory_mask = None if memory_mask is None else memory_mask.repeat_interleave(k, dim=0)
    scores = torch.zeros(b, k, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    if prompt is not None:
        prompt = prompt.repeat_interleave(k, dim=0)
        prompt_mask = None if prompt_mask is None else prompt_mask.repeat_interleave(k, dim=0)
    seqs, seq_mask = _start(bos, b * k, dev, prompt, prompt_mask)
    start = seqs.shape[1]
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    cache = DecoderCache() if use_cache else None
    for _ in range(max_len):
        logp = torch.log_softmax(_step(decoder, seqs, memory, memory_mask, cache, seq_mask).float(), dim=-1)
        logp[done] = float("-inf")
        logp[done, pad] = 0.0
        vocab = logp.shape[-1]
        top, idx = (scores.reshape(-1, 1) + logp).view(b, k * vocab).topk(k, dim=-1)
        src = (torch.arange(b, device=dev)[:, None] * k + idx // vocab).view(-1)
        tok = (idx % vocab).view(-1)
        seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
        seq_mask = None if seq_mask is None else seq_mask[src]
        done = done[src] | (tok == eos)
        scores = top
        if cache is not None:
            cache.reorder(src)
        if done.all():
            break
    lengths = (seqs[:, start:] != pad).sum(-1).clamp(min=1).view(b, k).float()
    best = (scores / lengths**length_penalty).argmax(-1)
    return seqs.view(b, k, -1)[torch.arange(b, device=dev), best, start:]
