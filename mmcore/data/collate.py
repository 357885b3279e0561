"""Batching decoded samples: stack images, right-pad token ids to the longest in the batch."""

from __future__ import annotations

import random
import zlib
from typing import Any

import torch
from torch import Tensor

from mmcore.data.negatives import batch_edit_negatives


def pad_ids(seqs: list[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D id tensors -> `(ids (B, L), mask (B, L))`, mask 1 on real tokens."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def collate(samples: list[dict[str, Any]], pad_id: int = 0, swap_share: float = 0.0) -> dict[str, Any]:
    """Decoded samples -> batch: tensors `image (B, 3, S, S)`, `caption_ids/_mask`, `question_ids/_mask`,
    `answer_ids/_mask` `(B, L*)`, `has_qa (B,)`; lists `key`, `captions`, `qa`; and the audio fields
    of `collate_audio` when the samples carry audio.

    Samples with further QA pairs (`more_qa`) make the question rows longer than the batch: the
    question, answer and `has_qa` tensors get `M > B` rows (each sample's first pair, then the
    rest) and `question_image (M,)` says which image each row asks about. Samples that carry
    `caption_variants` add `edit_neg_ids/_mask (B', L)` and `edit_neg_image (B',)`: one-word-edited
    captions that match no caption of their image (`mmcore.data.negatives`), for the B' samples
    that have one; `swap_share` of them swap two words of one kind within the caption instead."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
    batch["caption_ids"], batch["caption_mask"] = pad_ids([s["caption_ids"] for s in samples], pad_id)
    rows = [(b, s["question_ids"], s["answer_ids"], bool(s["has_qa"])) for b, s in enumerate(samples)]
    rows += [(b, q, a, True) for b, s in enumerate(samples) for q, a in s.get("more_qa", ())]
    batch["question_ids"], batch["question_mask"] = pad_ids([r[1] for r in rows], pad_id)
    batch["answer_ids"], batch["answer_mask"] = pad_ids([r[2] for r in rows], pad_id)
    batch["has_qa"] = torch.tensor([r[3] for r in rows])
    if len(rows) > len(samples):
        batch["question_image"] = torch.tensor([r[0] for r in rows])
    if len(samples) > 1 and all("caption_variants" in s for s in samples):
        _add_edit_negatives(batch, samples, pad_id, swap_share)
    if "audio" in samples[0]:
        batch.update(collate_audio(samples, pad_id))
    for name in ("key", "captions", "qa"):
        batch[name] = [s[name] for s in samples]
    return batch


def _add_edit_negatives(batch: dict[str, Any], samples: list[dict[str, Any]], pad_id: int, swap_share: float) -> None:
    """`edit_neg_ids/_mask` and `edit_neg_image` into `batch`; the edits are drawn from a generator
    seeded by the samples' keys, so a batch gets the same negatives every time it is built."""
    rng = random.Random(zlib.crc32("\n".join(str(s["key"]) for s in samples).encode()))
    captions = [s["caption_ids"].tolist() for s in samples]
    negatives = batch_edit_negatives(captions, [s["caption_variants"] for s in samples], rng, swap_share)
    kept = [(b, torch.tensor(n)) for b, n in enumerate(negatives) if n is not None]
    if kept:
        batch["edit_neg_ids"], batch["edit_neg_mask"] = pad_ids([n for _, n in kept], pad_id)
        batch["edit_neg_image"] = torch.tensor([b for b, _ in kept])


def pad_waves(waves: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D waveforms with zeros -> `(audio (B, T), lengths (B,))`; T >= 1."""
    length = max(1, max(len(w) for w in waves))
    audio = torch.zeros((len(waves), length))
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    return audio, torch.tensor([len(w) for w in waves], dtype=torch.long)


def pad_tokens(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad token sequences `(N_i, D)` with zeros -> `(tokens (B, N, D), mask (B, N) bool)`."""
    tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    lengths = torch.tensor([len(t) for t in seqs], device=tokens.device)
    return tokens, torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]


def collate_audio(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """`audio (B, T)`, `audio_lengths (B,)`, `has_audio (B,)`, `transcript_ids/_mask (B, L)`,
    `question_audio (B, Tq)`, `question_audio_lengths (B,)`, `has_question_audio (B,)`."""
    batch: dict[str, Tensor] = {}
    for name in ("audio", "question_audio"):
        batch[name], batch[f"{name}_lengths"] = pad_waves([s[name] for s in samples])
        batch[f"has_{name}"] = torch.tensor([bool(s[f"has_{name}"]) for s in samples])
    batch["transcript_ids"], batch["transcript_mask"] = pad_ids([s["transcript_ids"] for s in samples], pad_id)
    return batch
