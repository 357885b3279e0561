"""Shared fixtures: tiny shard-like samples (real JPEG bytes), a tokenizer trained on them, a tiny model."""

from __future__ import annotations

import io
import json

import pytest
import torch
from mmcore_support import tiny_config
from PIL import Image, ImageDraw

from mmcore.data import SampleConfig, collate, decode_sample, train_tokenizer
from mmcore.model import build_model

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ["circle", "square"]


def make_sample(i: int) -> dict:
    """A shard sample like the ingest job writes: one coloured shape, captions and a QA pair."""
    # Distinct (colour, shape, side) for i < 16, so captions in a batch never repeat.
    colour, shape, side = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2], ["left", "right"][(i // 8) % 2]
    im = Image.new("RGB", (96, 96), "white")
    x0 = 8 if side == "left" else 52
    box = (x0, 30, x0 + 36, 66)
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    caption = f"a {colour} {shape} on the {side}"
    meta = {
        "id": str(i), "captions": [caption, f"a {shape} that is {colour}"],
        "qa": [{"question": f"what colour is the {shape}?", "answers": [colour, colour, "dark " + colour]}],
        "split": "train", "source": "test", "width": 96, "height": 96, "meta": {},
    }
    return {"__key__": f"s{i:04d}", "jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}


@pytest.fixture(scope="session")
def samples() -> list[dict]:
    return [make_sample(i) for i in range(16)]


@pytest.fixture(scope="session")
def tokenizer(samples):
    texts = []
    for s in samples:
        meta = json.loads(s["json"])
        texts += meta["captions"] + [q["question"] for q in meta["qa"]] + [a for q in meta["qa"] for a in q["answers"]]
    return train_tokenizer(texts, vocab_size=200)


@pytest.fixture(scope="session")
def sample_cfg() -> SampleConfig:
    return SampleConfig(image_size=32, max_text_len=16, max_answer_len=6)


@pytest.fixture()
def batch(samples, tokenizer, sample_cfg):
    return collate([decode_sample(s, tokenizer, sample_cfg, train=False) for s in samples[:4]])


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_model(tiny_config(tokenizer)).eval()
