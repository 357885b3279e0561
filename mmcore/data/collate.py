"""Batching decoded samples: stack images, right-pad token ids to the longest in the batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def pad_ids(seqs: list[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D id tensors -> `(ids (B, L), mask (B, L))`, mask 1 on real tokens."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def collate(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Decoded samples -> batch: tensors `image (B, 3, S, S)`, `caption_ids/_mask`, `question_ids/_mask`,
    `answer_ids/_mask` `(B, L*)`, `has_qa (B,)`; lists `key`, `captions`, `qa`; and the audio fields
    of `collate_audio` when the samples carry audio."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
    for name in ("caption", "question", "answer"):
        batch[f"{name}_ids"], batch[f"{name}_mask"] = pad_ids([s[f"{name}_ids"] for s in samples], pad_id)
    batch["has_qa"] = torch.tensor([bool(s["has_qa"]) for s in samples])
    if "audio" in samples[0]:
        batch.update(collate_audio(samples, pad_id))
    for name in ("key", "captions", "qa"):
        batch[name] = [s[name] for s in samples]
    return batch


def pad_waves(waves: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D waveforms with zeros -> `(audio (B, T), lengths (B,))`; T >= 1."""
    length = max(1, max(len(w) for w in waves))
    audio = torch.zeros((len(waves), length))
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    return audio, torch.tensor([len(w) for w in waves], dtype=torch.long)


def collate_audio(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """`audio (B, T)`, `audio_lengths (B,)`, `has_audio (B,)`, `transcript_ids/_mask (B, L)`,
    `question_audio (B, Tq)`, `question_audio_lengths (B,)`, `has_question_audio (B,)`."""
    batch: dict[str, Tensor] = {}
    for name in ("audio", "question_audio"):
        batch[name], batch[f"{name}_lengths"] = pad_waves([s[name] for s in samples])
        batch[f"has_{name}"] = torch.tensor([bool(s[f"has_{name}"]) for s in samples])
    batch["transcript_ids"], batch["transcript_mask"] = pad_ids([s["transcript_ids"] for s in samples], pad_id)
    return batch
