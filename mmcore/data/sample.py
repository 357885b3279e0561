"""One path from a shard sample (`jpg`, `txt`, `json`) to tensors: training, evaluation and inference."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from mmcore.data.shard import ShardSample, parse_sample
from mmcore.data.tokenizer import encode
from mmcore.data.transforms import image_transform, load_image, train_image


@dataclass
class SampleConfig:
    image_size: int = 64
    max_text_len: int = 32  # caption / question tokens, [CLS] and [SEP] included
    max_answer_len: int = 8
    # Training only: question-answer pairs drawn per sample (distinct, at most all it has), each its
    # own row of the VQA batch with the image encoded once (`collate`'s `question_image`).
    qa_per_sample: int = 1
    # Training only: also encode every caption of the sample (`caption_variants`), so that the batch
    # can build one-word-edited ITM negatives that no caption of the image reads like
    # (`mmcore.data.negatives`).
    caption_variants: bool = False
    # With caption_variants: the share of those negatives that swap two words of one kind within
    # the caption instead ("red ... blue" -> "blue ... red"), for `collate`.
    swap_share: float = 0.0
    # Also decode the audio (a model with an audio encoder): the spoken caption and the chosen QA
    # pair's spoken question, as waveforms the caller has decoded already (mmcore reads no FLAC).
    audio: bool = False


def _choose_qa(pairs: list[dict], train: bool, rng, k: int = 1) -> list[tuple[dict, str]]:
    """Of answerable `pairs`: training takes `k` distinct random pairs (fewer if it has fewer), each
    with a random answer; evaluation the first pair and its most common answer. [] without pairs."""
    if not pairs:
        return []
    if not train:
        return [(pairs[0], Counter(pairs[0]["answers"]).most_common(1)[0][0])]
    chosen = [rng.choice(pairs)] if k <= 1 else rng.sample(pairs, min(k, len(pairs)))
    return [(p, rng.choice(p["answers"])) for p in chosen]


def waveform(audio) -> torch.Tensor:
    """A decoded clip (float samples: a tensor, array or list; None = no audio) -> `(T,)` float32."""
    if audio is None:
        return torch.zeros(0)
    if isinstance(audio, (bytes, bytearray)):
        raise TypeError("audio members must be decoded to float samples before decode_sample "
                        "(pipelines.core.audio.decode_audio_members); mmcore reads no FLAC")
    return torch.as_tensor(audio, dtype=torch.float32).reshape(-1)


def _audio_fields(sample: ShardSample, pair: dict | None, tokenizer, cfg: SampleConfig) -> dict[str, Any]:
    """`audio (T,)` the spoken caption, `transcript_ids (L,)` the primary caption it speaks,
    `question_audio (Tq,)` the chosen pair's spoken question; empty tensors where absent."""
    spoken = sample.spoken.get(pair.get("audio")) if pair else None
    return {
        "audio": waveform(sample.audio), "has_audio": sample.audio is not None,
        "transcript_ids": torch.tensor(encode(tokenizer, sample.caption, cfg.max_text_len)),
        "question_audio": waveform(spoken), "has_question_audio": spoken is not None,
    }


def decode_sample(sample: dict | ShardSample, tokenizer, cfg: SampleConfig, train: bool, rng=None) -> dict[str, Any]:
    """Shard sample (raw, or parsed by `parse_sample`) -> `{"key", "image" (3, S, S),
    "caption_ids" (L,), "question_ids" (Lq,), "answer_ids" (La,), "has_qa", "captions", "qa"}`.
    Raw members may be bytes or already decoded.

    Training picks a random caption (and QA pair); evaluation uses the primary caption (`txt`).
    With `cfg.qa_per_sample` > 1, training adds `"more_qa"`: `[(question_ids, answer_ids), ...]`
    for the further pairs drawn; with `cfg.caption_variants`, `"caption_variants"`: every caption's
    ids as a tuple.
    With `cfg.audio`, also `audio`, `has_audio`, `transcript_ids`, `question_audio`,
    `has_question_audio` (`_audio_fields`).
    """
    rng = rng or random
    if not isinstance(sample, ShardSample):
        if "jpg" not in sample:
            raise KeyError(f"sample {sample.get('__key__', '')!r} has no 'jpg' member; members are {sorted(sample)}")
        sample = parse_sample(sample)
    caption = rng.choice(sample.captions) if train else sample.caption
    chosen = _choose_qa(sample.answerable_qa, train, rng, cfg.qa_per_sample)
    pair, answer = chosen[0] if chosen else (None, "")
    question = pair["question"] if pair else ""
    img = load_image(sample.image)
    image = train_image(img, cfg.image_size, rng) if train else image_transform(cfg.image_size, False)(img)
    out = {
        **(_audio_fields(sample, pair, tokenizer, cfg) if cfg.audio else {}),
        "key": sample.key,
        "image": image,
        "caption_ids": torch.tensor(encode(tokenizer, caption, cfg.max_text_len)),
        "question_ids": torch.tensor(encode(tokenizer, question, cfg.max_text_len)),
        "answer_ids": torch.tensor(encode(tokenizer, answer, cfg.max_answer_len)),
        "has_qa": bool(chosen),
        "captions": sample.captions,
        "qa": sample.qa,
    }
    if len(chosen) > 1:
        out["more_qa"] = [(torch.tensor(encode(tokenizer, p["question"], cfg.max_text_len)),
                           torch.tensor(encode(tokenizer, a, cfg.max_answer_len))) for p, a in chosen[1:]]
    if train and cfg.caption_variants:
        out["caption_variants"] = [tuple(encode(tokenizer, c, cfg.max_text_len)) for c in sample.captions]
    return out
