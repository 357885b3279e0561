"""Sample decoding: shard sample -> tensors, tokenizer, transforms, collate.

The names load on first use (PEP 562), so that parsing shards (`parse_sample`) and training a
tokenizer (`train_tokenizer`), which ingest does, import neither torch nor torchvision."""

from __future__ import annotations

import importlib

_WHERE = {
    "collate": "collate", "collate_audio": "collate", "pad_ids": "collate", "pad_waves": "collate", "pad_tokens": "collate",
    "SampleConfig": "sample", "decode_sample": "sample", "waveform": "sample",
    "ShardSample": "shard", "parse_sample": "shard",
    "SPECIAL_TOKENS": "tokenizer", "decode_text": "tokenizer", "encode": "tokenizer", "load_tokenizer": "tokenizer",
    "special_token_ids": "tokenizer", "train_tokenizer": "tokenizer",
    "image_to_tensor": "transforms", "image_transform": "transforms", "load_image": "transforms",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
