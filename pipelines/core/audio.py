"""Reading a shard sample's audio members (the spoken caption `flac`, the spoken questions
`q<k>.flac`) into waveforms, for training, evaluation and inference alike: mmcore reads no FLAC,
so its `decode_sample` gets the waveforms from here."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


class AudioFormatError(ValueError):
    """A stored audio member that is not what the shard contract promises (mono FLAC at the model's rate)."""


def read_flac(data: bytes) -> tuple[np.ndarray, int]:
    """A shard's `flac` member -> (float32 mono samples `(T,)`, sample rate)."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return samples, int(rate)


def waveform_of(data: bytes, sample_rate: int, where: str = "audio") -> np.ndarray:
    """`(T,)` float32 samples of a stored mono FLAC at `sample_rate`; a clear error otherwise."""
    samples, rate = read_flac(data)
    if rate != sample_rate or samples.ndim != 1:
        raise AudioFormatError(
            f"{where}: {rate} Hz with shape {samples.shape}, but the model's audio encoder reads mono "
            f"{sample_rate} Hz; re-ingest the data with data.audio_sample_rate={sample_rate}")
    return samples


def audio_member_names(raw: dict) -> list[str]:
    """The sample's audio members: `flac` and every `<name>.flac` (its spoken questions)."""
    return [name for name in raw if name == "flac" or name.endswith(".flac")]


def decode_audio_members(raw: dict, sample_rate: int) -> dict:
    """A raw shard sample with its audio members (FLAC bytes) replaced by `(T,)` float32 waveforms."""
    key = raw.get("__key__", "?")
    out = dict(raw)
    for name in audio_member_names(raw):
        if isinstance(raw[name], (bytes, bytearray)):
            out[name] = waveform_of(raw[name], sample_rate, f"sample {key!r} member {name}")
    return out
