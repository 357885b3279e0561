"""The shard sample's schema, parsed without tensors: `txt`, `json`, `jpg`, `flac` and the spoken
questions' members to a `ShardSample`. No torch here, so that ingest and inspection (which train
a tokenizer on, or count, what shards hold) never pay for importing it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShardSample:
    """One shard sample with its members read: the one owner of the `txt`/`json` schema.

    `image` is the `jpg` member as stored (JPEG bytes, or an image a caller decoded already;
    None when the sample has none); `caption` the primary caption (`txt`, "" for a QA-only
    sample); `captions` all of them; `qa` the `{"question", "answers"}` pairs as stored; `meta`
    the whole `json` document (`id`, `split`, `source`, `width`, `height`, `meta`, ...);
    `audio` the `flac` member as stored (mono 16 kHz FLAC bytes, or a waveform a caller decoded
    already), None when the sample has none: it speaks the primary caption; `spoken` the spoken
    questions by member name (`q<k>.flac`, which the QA pair names as its `audio`), as stored.
    """

    key: str
    image: Any
    caption: str
    captions: list[str]
    qa: list[dict]
    meta: dict = field(default_factory=dict)
    audio: Any = None
    spoken: dict[str, Any] = field(default_factory=dict)

    @property
    def answerable_qa(self) -> list[dict]:
        """The QA pairs that have a question and at least one answer."""
        return [p for p in self.qa if p.get("question") and p.get("answers")]

    @property
    def split(self) -> str | None:
        return self.meta.get("split")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _meta(sample: dict) -> dict:
    value = sample.get("json")
    if value is None:
        return {}
    return value if isinstance(value, dict) else json.loads(_text(value))


def parse_sample(raw: dict) -> ShardSample:
    """A raw shard sample (`{"__key__", "jpg", "txt", "json"}`, members as bytes or already
    decoded) -> `ShardSample`. No image is decoded."""
    meta = _meta(raw)
    primary = _text(raw["txt"]) if "txt" in raw else (meta.get("captions") or [""])[0]
    return ShardSample(
        key=raw.get("__key__", ""),
        image=raw.get("jpg"),
        caption=primary,
        captions=list(meta.get("captions") or [primary]),
        qa=list(meta.get("qa") or []),
        meta=meta,
        audio=raw.get("flac"),
        spoken={p["audio"]: raw[p["audio"]] for p in meta.get("qa") or []
                if isinstance(p.get("audio"), str) and p["audio"] in raw},
    )
