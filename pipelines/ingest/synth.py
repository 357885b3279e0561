"""The captioned-shapes set: a synthetic raw source in the project's raw JSONL format.

Each scene holds 1-3 shapes in distinct columns (left / middle / right) on a random gradient
background. Captions are a few fixed templates over a small vocabulary (colour, size, shape,
position), so a tiny model can learn them; question-answer pairs ask about colour, shape, size,
count and position. Sample `i` depends only on `(seed, i)`, so any prefix of a larger set is the
smaller set.

With `audio=True` (`data.synth_audio`) each scene's primary caption is also spoken
(`audio/<id>.flac`, the JSONL `audio` field) and each question asked by voice (the QA pair's
`audio`), by espeak-ng with a voice, speed, pitch and background noise drawn per utterance
(`speech.py`), from a generator of its own: the images and texts are the same with or without.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmcore.metrics.grounding import PhraseVocab
from pipelines.ingest.audioclean import to_flac, to_pcm16
from pipelines.ingest.speech import RATE, Speaker

IMAGE_SIZE = 112
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at little cost
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 20),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.18, "large": 0.30}  # extent as a fraction of the image side
COLUMNS = ("left", "middle", "right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
GENERATOR = "mmfusion-shapes"
PHRASE_VOCAB = PhraseVocab(tuple(SIZES), tuple(COLORS), SHAPES)  # "<size> <colour> <shape>"


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    position: str  # left | middle | right
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height

    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


# ----------------------------------------------------------------------------- scene


def _sample_scene(rng: np.random.Generator) -> list[Shape]:
    """1-3 shapes, one per column, left to right; colours+shapes distinct within a scene."""
    count = int(rng.integers(1, 4))
    columns = sorted(rng.choice(3, size=count, replace=False).tolist())
    colors = rng.choice(list(COLORS), size=count, replace=False).tolist()
    kinds = rng.choice(SHAPES, size=count, replace=False).tolist()
    shapes = []
    for col, color, kind in zip(columns, colors, kinds, strict=True):
        size = str(rng.choice(list(SIZES)))
        x = (col + 0.5) / 3 + rng.uniform(-0.015, 0.015)
        y = 0.5 + rng.uniform(-0.25, 0.25)
        shapes.append(Shape(kind, color, size, COLUMNS[col], x, y))
    return shapes


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """A two-colour gradient at a random angle, a smooth random texture and mild noise: varied
    low frequencies, so the perceptual hashes of different scenes stay far apart."""
    c0, c1 = rng.uniform(60, 200, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
    t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t[..., None]
    blobs = rng.normal(0, 40, size=(6, 6)).astype(np.float32)  # smooth random texture
    img += np.asarray(Image.fromarray(blobs).resize((side, side), Image.Resampling.BICUBIC))[..., None]
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * 6
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, side: int) -> None:
    cx, cy, r = s.x * side, s.y * side, SIZES[s.size] * side / 2
    fill = COLORS[s.color]
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "square":
        q = r * 0.88
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif s.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def render(shapes: list[Shape], rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene: (size, size) RGB."""
    big = size * _SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for s in shapes:
        _draw_shape(draw, s, big)
    layer = layer.resize((size, size), Image.Resampling.BOX)
    img = _background(rng, size).convert("RGBA")
    return Image.alpha_composite(img, layer).convert("RGB")


# ----------------------------------------------------------------------------- text


def captions(shapes: list[Shape]) -> list[str]:
    """Five paraphrases that state what is there and where."""
    p = [s.phrase() for s in shapes]
    if len(shapes) == 1:
        pos = "in the middle" if shapes[0].position == "middle" else f"on the {shapes[0].position}"
        return [
            f"a {p[0]} {pos}",
            f"there is a {p[0]} {pos}",
            f"a picture of a {p[0]} {pos}",
            f"one {p[0]} {pos}",
            f"a single {p[0]} {pos} of the image",
        ]
    if len(shapes) == 2:
        return [
            f"a {p[0]} to the left of a {p[1]}",
            f"a {p[1]} to the right of a {p[0]}",
            f"a {p[0]} on the left and a {p[1]} on the right",
            f"two shapes : a {p[0]} and a {p[1]}",
            f"there is a {p[0]} left of a {p[1]}",
        ]
    return [
        f"a {p[0]} , a {p[1]} and a {p[2]} from left to right",
        f"a {p[0]} on the left , a {p[1]} in the middle and a {p[2]} on the right",
        f"three shapes : a {p[0]} , a {p[1]} and a {p[2]}",
        f"a {p[1]} between a {p[0]} and a {p[2]}",
        f"there is a {p[0]} , a {p[1]} and a {p[2]}",
    ]


def questions(shapes: list[Shape], rng: np.random.Generator) -> list[dict]:
    """Colour, shape, size, count and position questions; single-word answers."""
    qa = [{"question": "how many shapes are there?", "answers": [NUMBER_WORDS[len(shapes)]]}]
    s = shapes[int(rng.integers(len(shapes)))]
    qa.append({"question": f"what color is the {s.shape}?", "answers": [s.color]})
    qa.append({"question": f"what size is the {s.color} {s.shape}?", "answers": [s.size]})
    where = "in the middle" if s.position == "middle" else f"on the {s.position}"
    qa.append({"question": f"what shape is {where}?", "answers": [s.shape]})
    other = [c for c in COLORS if c not in {x.color for x in shapes}]
    probe = str(rng.choice(other)) if rng.random() < 0.5 else s.color
    kind = str(rng.choice(SHAPES))
    has = any(x.color == probe and x.shape == kind for x in shapes)
    qa.append({"question": f"is there a {probe} {kind}?", "answers": ["yes" if has else "no"]})
    return qa


def scene_objects(sample_meta: dict) -> list[tuple[str, str, str]] | None:
    """The `(size, colour, shape)` of each object of a shard sample made by this generator (its
    `json` member as a dict), or None for samples from any other source."""
    meta = sample_meta.get("meta") or {}
    if meta.get("generator") != GENERATOR or not isinstance(meta.get("shapes"), list):
        return None
    return [(s["size"], s["color"], s["shape"]) for s in meta["shapes"]]


# ----------------------------------------------------------------------------- writer


def make_sample(seed: int, index: int) -> tuple[dict, Image.Image]:
    """The JSONL record (image path filled in by the caller) and the image for sample `index`."""
    rng = np.random.default_rng([seed, index])
    shapes = _sample_scene(rng)
    image = render(shapes, rng)
    record = {
        "id": f"shapes-s{seed}-{index:06d}",
        "captions": captions(shapes),
        "qa": questions(shapes, rng),
        "meta": {
            "generator": GENERATOR,
            "seed": seed,
            "index": index,
            "license": "CC0-1.0",
            "shapes": [s.__dict__ for s in shapes],
        },
    }
    return record, image


def make_speech(record: dict, seed: int, index: int, speaker: Speaker) -> dict[str, bytes]:
    """The spoken primary caption and questions of sample `index` as FLAC files (relative path ->
    bytes); sets `record["audio"]`, each QA pair's `audio` and `meta["speech"]` (who said what)."""
    rng = np.random.default_rng([seed, index, 1])  # apart from the image's: images stay the same
    files, voices = {}, []
    texts = [(f"audio/{record['id']}.flac", record["captions"][0])]
    texts += [(f"audio/{record['id']}-q{k}.flac", pair["question"]) for k, pair in enumerate(record["qa"])]
    for rel, text in texts:
        samples, voice = speaker.utterance(text, rng)
        files[rel] = to_flac(to_pcm16(samples), RATE)
        voices.append({"voice": voice.name, "speed": voice.speed, "pitch": voice.pitch,
                       "seconds": round(len(samples) / RATE, 3)})
    record["audio"] = texts[0][0]
    for pair, (rel, _) in zip(record["qa"], texts[1:], strict=True):
        pair["audio"] = rel
    record["meta"]["speech"] = {"caption": voices[0], "questions": voices[1:]}
    return files


def _write_sample(out: Path, seed: int, index: int, speaker: Speaker | None) -> str:
    """Write sample `index`'s files; returns its JSONL line."""
    record, image = make_sample(seed, index)
    rel = f"images/{record['id']}.jpg"
    image.save(out / rel, format="JPEG", quality=95)
    for path, data in (make_speech(record, seed, index, speaker) if speaker else {}).items():
        (out / path).write_bytes(data)
    return json.dumps({"id": record["id"], "image": rel, **{k: v for k, v in record.items() if k != "id"}})


def synthesize(out_dir: str | Path, num: int, seed: int = 0, audio: bool = False) -> Path:
    """Write `num` samples to `out_dir/samples.jsonl` + `out_dir/images/*.jpg` (and with `audio`,
    `out_dir/audio/*.flac`: see the module's docstring); returns out_dir.

    Deterministic for `(seed, num, audio)`: the same call writes byte-identical files. With audio
    the samples are made on a few threads (espeak-ng runs as subprocesses), with progress on stderr.
    """
    if num < 1:
        raise ValueError(f"synthesize: num must be >= 1, got {num}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if not audio:
        lines = [_write_sample(out, seed, i, None) for i in range(num)]
    else:
        (out / "audio").mkdir(exist_ok=True)
        lines = _spoken(out, num, seed, Speaker())
    tmp = out / "samples.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "samples.jsonl")
    return out


def _spoken(out: Path, num: int, seed: int, speaker: Speaker) -> list[str]:
    """Every sample's line, made on threads, in order; a progress line every 10 s."""
    lines, t0 = [], time.time()
    last = t0
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for line in pool.map(lambda i: _write_sample(out, seed, i, speaker), range(num)):
            lines.append(line)
            if time.time() - last > 10:
                last = time.time()
                print(f"[synth] {len(lines)}/{num} spoken samples ({len(lines) / (last - t0):.1f}/s, "
                      f"{speaker.calls} espeak-ng runs)", file=sys.stderr, flush=True)
    return lines
