"""Inference on user images: captions, answers, text-to-image retrieval (batched, CPU or GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.core.storage import IMAGE_SUFFIXES


@dataclass
class Predictor:
    model: object
    tokenizer: object
    image_size: int
    max_text_len: int
    device: str


def load_predictor(cfg, uri, device: str | None = None) -> Predictor:
    """Resolve `uri` (checkpoint dir or `models:/...`) and load it for inference."""
    from mmcore.checkpoint import load_checkpoint
    from pipelines.core.model_uri import resolve_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve_model(cfg, uri)
    model, tok, _ = load_checkpoint(ckpt, device=device)
    if tok is None:
        raise ValueError(f"{ckpt} has no tokenizer files; cannot turn generated ids into text")
    return Predictor(model, tok, model.cfg.image.image_size, cfg.model.max_text_len, device)


def media_files(folder, suffixes: tuple[str, ...], option: str = "--images", kind: str = "image") -> list[Path]:
    """Files directly in `folder` whose suffix is one of `suffixes`, sorted by name; an error names
    the command-line `option` when the folder is missing or holds no `kind` file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"{option} {folder}: no {kind} files ({', '.join(suffixes)})")
    return files


def image_files(folder) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return media_files(folder, IMAGE_SUFFIXES)


def _images(p: Predictor, paths) -> torch.Tensor:
    """Image files -> `(B, 3, S, S)` with the evaluation transform."""
    from mmcore.data import image_to_tensor

    return torch.cat([image_to_tensor(path, p.image_size) for path in paths]).to(p.device)


@torch.no_grad()
def caption(p: Predictor, paths, max_len: int = 24, num_beams: int = 1, batch_size: int = 16) -> list[str]:
    from mmcore.data import decode_text

    out: list[str] = []
    for s in range(0, len(paths), batch_size):
        ids = p.model.generate(_images(p, paths[s: s + batch_size]), max_len, num_beams=num_beams)
        out += decode_text(p.tokenizer, ids)
    return out


@torch.no_grad()
def answer(p: Predictor, path, question: str, max_len: int = 8) -> str:
    from mmcore.data import decode_text, encode

    ids = torch.tensor([encode(p.tokenizer, question, p.max_text_len)], device=p.device)
    out = p.model.generate(_images(p, [path]), max_len, prompt_ids=ids, prompt_mask=torch.ones_like(ids))
    return decode_text(p.tokenizer, out)[0]


@torch.no_grad()
def retrieve(p: Predictor, paths, text: str, top_k: int = 5, batch_size: int = 32) -> list[tuple[Path, float]]:
    """The `top_k` images most similar to `text` (cosine similarity of the ITC embeddings)."""
    from mmcore.data import encode

    ids = torch.tensor([encode(p.tokenizer, text, p.max_text_len)], device=p.device)
    _, t = p.model.encode_text(ids, torch.ones_like(ids))
    embs = [p.model.encode_image(_images(p, paths[s: s + batch_size]))[1] for s in range(0, len(paths), batch_size)]
    sims = (torch.cat(embs) @ t[0]).float().cpu()
    order = sims.argsort(descending=True)[:top_k]
    return [(Path(paths[i]), float(sims[i])) for i in order.tolist()]
