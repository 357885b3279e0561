"""Inference on user audio files: transcripts, answers to spoken questions, audio retrieval by text.

A file goes through ingest's cleaning (`pipelines.ingest.audioclean`: decoded by content, mixed
down to mono, resampled to the model's rate), so what the model hears is what it was trained on;
a file cleaning refuses raises `AudioReject` with the reason (`not_audio`, `silent_audio`, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.serve.predict import Predictor, _images, media_files

MAX_SECONDS = 600.0  # a longer file is refused: the encoder attends over every 20 ms token


def audio_files(folder) -> list[Path]:
    """Audio files (ingest's `AUDIO_SUFFIXES`) directly in `folder`, sorted by name."""
    from pipelines.ingest.sources.common import AUDIO_SUFFIXES

    return media_files(folder, AUDIO_SUFFIXES, "--audio", "audio")


def _sample_rate(p: Predictor) -> int:
    if p.model.cfg.audio is None:
        raise ValueError("this model has no audio encoder; train one with model.audio_encoder set "
                         "(e.g. mmfusion run --config configs/audio.yaml) and pass it with --model")
    return p.model.cfg.audio.sample_rate


def load_waveform(path, sample_rate: int) -> torch.Tensor:
    """An audio file -> `(T,)` float32 mono samples at `sample_rate`, cleaned as ingest cleans."""
    from pipelines.config import DataConfig
    from pipelines.core.audio import read_flac
    from pipelines.ingest.audioclean import AudioReject, AudioSpec, clean_audio

    spec = AudioSpec.of(DataConfig(audio_sample_rate=sample_rate, max_audio_s=MAX_SECONDS))
    try:
        clean = clean_audio(Path(path).read_bytes(), spec)
    except AudioReject as e:
        raise AudioReject(e.reason, f"{path}: {e.detail}") from e
    return torch.from_numpy(read_flac(clean.flac)[0])


def _waves(p: Predictor, paths) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio files -> `(audio (B, T), lengths (B,))` on the predictor's device."""
    from mmcore.data import pad_waves

    rate = _sample_rate(p)
    wave, lengths = pad_waves([load_waveform(path, rate) for path in paths])
    return wave.to(p.device), lengths.to(p.device)


@torch.no_grad()
def transcribe(p: Predictor, paths, max_len: int = 24, num_beams: int = 1, batch_size: int = 8) -> list[str]:
    from mmcore.data import decode_text

    out: list[str] = []
    for s in range(0, len(paths), batch_size):
        wave, lengths = _waves(p, paths[s: s + batch_size])
        out += decode_text(p.tokenizer, p.model.transcribe(wave, lengths, max_len, num_beams=num_beams))
    return out


@torch.no_grad()
def answer_spoken(p: Predictor, image, question_audio, max_len: int = 8) -> str:
    """The answer to the question spoken in `question_audio` about `image`."""
    from mmcore.data import decode_text

    wave, lengths = _waves(p, [question_audio])
    return decode_text(p.tokenizer, p.model.answer_spoken(_images(p, [image]), wave, lengths, max_len))[0]


@torch.no_grad()
def retrieve_audio(p: Predictor, paths, text: str, top_k: int = 5, rerank_k: int = 0,
                   batch_size: int = 8) -> list[tuple[Path, float]]:
    """The `top_k` clips that best match `text`, best first, each with its score.

    Clips are ranked by the cosine similarity of the audio-text embeddings (the score). With
    `rerank_k` > 0 the nearest max(rerank_k, top_k) are re-ranked by log p(text | clip) under the
    speech decoder, which is then their score, as evaluation does (`eval.audio_rerank_k`)."""
    from mmcore.data import encode, pad_tokens

    ids = torch.tensor([encode(p.tokenizer, text, p.max_text_len)], device=p.device)
    _, t = p.model.encode_text(ids, torch.ones_like(ids))
    embs, tokens = [], []
    for s in range(0, len(paths), batch_size):
        clip_tokens, mask, emb = p.model.encode_audio(*_waves(p, paths[s: s + batch_size]))
        embs.append(emb)
        tokens += [clip_tokens[j, mask[j]] for j in range(len(emb))]
    sims = (torch.cat(embs) @ t[0]).float().cpu()
    order = sims.argsort(descending=True)[: max(rerank_k, top_k) if rerank_k > 0 else top_k]
    if rerank_k <= 0:
        return [(Path(paths[i]), float(sims[i])) for i in order.tolist()]
    scores = []
    for s in range(0, len(order), batch_size):
        memory, memory_mask = pad_tokens([tokens[i] for i in order[s: s + batch_size].tolist()])
        text_ids = ids.expand(len(memory), -1)
        scores.append(p.model.transcript_log_likelihood(memory, memory_mask, text_ids, torch.ones_like(text_ids)).cpu())
    loglik = torch.cat(scores)
    best = loglik.argsort(descending=True)[:top_k]
    return [(Path(paths[int(order[j])]), float(loglik[j])) for j in best.tolist()]
