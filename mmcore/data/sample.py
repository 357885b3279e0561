"""One path from a shard sample (`jpg`, `txt`, `json`) to tensors: training, evaluation and inference."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from mmcore.data.tokenizer import encode
from mmcore.data.transforms import image_transform, load_image, train_image


@dataclass
class SampleConfig:
    image_size: int = 64
    max_text_len: int = 32  # caption / question tokens, [CLS] and [SEP] included
    max_answer_len: int = 8


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _meta(sample: dict) -> dict:
    value = sample.get("json")
    if value is None:
        return {}
    return value if isinstance(value, dict) else json.loads(_text(value))


def _choose_qa(qa: list, train: bool, rng) -> tuple[str, str] | None:
    """Training: a random pair and a random answer; eval: the first pair and its most common answer."""
    pairs = [p for p in qa if p.get("question") and p.get("answers")]
    if not pairs:
        return None
    pair = rng.choice(pairs) if train else pairs[0]
    answers = pair["answers"]
    answer = rng.choice(answers) if train else Counter(answers).most_common(1)[0][0]
    return pair["question"], answer


def decode_sample(sample: dict, tokenizer, cfg: SampleConfig, train: bool, rng=None) -> dict[str, Any]:
    """Shard sample -> `{"key", "image" (3, S, S), "caption_ids" (L,), "question_ids" (Lq,),
    "answer_ids" (La,), "has_qa", "captions", "qa"}`. Members may be raw bytes or already decoded.

    Training picks a random caption (and QA pair); evaluation uses the primary caption (`txt`).
    """
    rng = rng or random
    key = sample.get("__key__", "")
    if "jpg" not in sample:
        raise KeyError(f"sample {key!r} has no 'jpg' member; members are {sorted(sample)}")
    meta = _meta(sample)
    primary = _text(sample["txt"]) if "txt" in sample else (meta.get("captions") or [""])[0]
    captions = meta.get("captions") or [primary]
    caption = rng.choice(captions) if train else primary
    qa = meta.get("qa") or []
    chosen = _choose_qa(qa, train, rng)
    question, answer = chosen if chosen else ("", "")
    img = load_image(sample["jpg"])
    image = train_image(img, cfg.image_size, rng) if train else image_transform(cfg.image_size, False)(img)
    return {
        "key": key,
        "image": image,
        "caption_ids": torch.tensor(encode(tokenizer, caption, cfg.max_text_len)),
        "question_ids": torch.tensor(encode(tokenizer, question, cfg.max_text_len)),
        "answer_ids": torch.tensor(encode(tokenizer, answer, cfg.max_answer_len)),
        "has_qa": chosen is not None,
        "captions": captions,
        "qa": qa,
    }
