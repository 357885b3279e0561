"""Attention you can look at: for one image (and optionally a question), the generated words, each
drawn over the image with the decoder's cross-attention as a heatmap (a grid of panels, PNG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PANEL = 160  # pixels per panel side
COLUMNS = 6
LABEL_HEIGHT = 22


@dataclass
class Explanation:
    """The generated text, its words (WordPiece tokens, EOS dropped) and one `(g, g)` map per word."""

    image: Image.Image
    question: str | None
    text: str
    words: list[str]
    maps: list[np.ndarray]


def explain(model, tokenizer, image: Image.Image, question: str | None = None, max_len: int = 24,
            max_text_len: int = 32) -> Explanation:
    """Generate for `image` (PIL RGB) and keep where each generated word looked."""
    from mmcore.data import decode_text, encode, image_to_tensor
    from mmcore.explain import generate_with_attention

    device = next(model.parameters()).device
    pixels = image_to_tensor(image, model.cfg.image.image_size).to(device)
    prompt = None
    if question:
        prompt = torch.tensor([encode(tokenizer, question, max_text_len)], device=device)
        max_len = min(max_len, 8)
    out = generate_with_attention(model, pixels, max_len, prompt)
    words, maps = [], []
    for token, amap in zip(out.tokens.tolist(), out.maps, strict=True):
        if token in (model.cfg.eos_id, model.cfg.pad_id):
            break
        words.append(tokenizer.convert_ids_to_tokens(token))
        maps.append(amap.float().cpu().numpy())
    return Explanation(image, question, decode_text(tokenizer, out.tokens[None])[0], words, maps)


def _heat(amap: np.ndarray, size: int) -> Image.Image:
    """A map `(g, g)` -> an RGBA overlay: transparent where unattended, opaque red-yellow at the peak."""
    m = amap / max(float(amap.max()), 1e-12)
    up = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
    up = up.astype(np.float32) / 255
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (up * 220).astype(np.uint8)
    rgba[..., 3] = (up * 170).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def _panel(image: Image.Image, label: str, amap: np.ndarray | None, font) -> Image.Image:
    base = image.convert("RGBA").resize((PANEL, PANEL), Image.Resampling.BICUBIC)
    if amap is not None:
        base = Image.alpha_composite(base, _heat(amap, PANEL))
    panel = Image.new("RGB", (PANEL, PANEL + LABEL_HEIGHT), "white")
    panel.paste(base.convert("RGB"), (0, 0))
    ImageDraw.Draw(panel).text((4, PANEL + 3), label[:24], fill="black", font=font)
    return panel


def render(expl: Explanation) -> Image.Image:
    """The image, then one panel per generated word with its attention heatmap; rows of COLUMNS."""
    font = ImageFont.load_default()
    first = "question" if expl.question else "input"
    panels = [_panel(expl.image, first, None, font)]
    panels += [_panel(expl.image, w, m, font) for w, m in zip(expl.words, expl.maps, strict=True)]
    cols = min(COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (cols * PANEL, rows * (PANEL + LABEL_HEIGHT) + LABEL_HEIGHT), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * PANEL, (i // cols) * (PANEL + LABEL_HEIGHT)))
    line = f"Q: {expl.question}  A: {expl.text}" if expl.question else expl.text
    ImageDraw.Draw(sheet).text((4, rows * (PANEL + LABEL_HEIGHT) + 4), line[:150], fill="black", font=font)
    return sheet


def save_explanation(expl: Explanation, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(expl).save(out, format="PNG")
    return out
