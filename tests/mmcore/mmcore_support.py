"""Helpers the mmcore tests share (fixtures stay in conftest.py, which no test imports)."""

from __future__ import annotations

from mmcore.data import special_token_ids
from mmcore.model import model_config


def tiny_config(tokenizer, **overrides):
    """Smaller than debug, for fast unit tests: 32px images, width 32."""
    base = {
        "vocab_size": len(tokenizer), "image_size": 32, "image.patch_size": 8, "image.hidden_dim": 32, "image.mlp_dim": 64,
        "text.hidden_size": 32, "text.intermediate_size": 64, "embed_dim": 16,
        **special_token_ids(tokenizer),
    }
    base.update(overrides)
    return model_config("debug", **base)
