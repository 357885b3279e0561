"""Builders of raw audio for the ingest tests: tones in any container and sample format, and the
bad-input corpus (each case with the reason it must be rejected with, or "kept")."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf


def tone(seconds: float = 1.0, rate: int = 16_000, freq: float = 440.0, amp: float = 0.5,
         channels: int = 1, seed: int = 0) -> np.ndarray:
    """(frames, channels) float32: a sine plus a little seeded noise (distinct clips per seed)."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = amp * np.sin(2 * np.pi * freq * t) + np.random.default_rng(seed).normal(0, 0.01, len(t))
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def encode_audio(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_header_only() -> bytes:
    """A RIFF/WAVE header (fmt chunk + a data chunk of 0 bytes): no samples at all."""
    fmt = struct.pack("<HHIIHH", 1, 1, 16_000, 32_000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 0)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def nan_float_wav() -> bytes:
    x = tone(1.0)
    x[1000:1010] = np.nan
    return encode_audio(x, 16_000, "WAV", "FLOAT")


def bad_corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason cleaning must give, or "kept"). Names carry the suffix the
    file is stored under (MP3 bytes are named `.wav` on purpose)."""
    flac = encode_audio(tone(2.0), 16_000, "FLAC")
    loud = tone(1.0, amp=1.0)
    loud[::10] = 1.0  # 10% of the samples at full scale
    return {
        "truncated.flac": (flac[: len(flac) // 2], "truncated_audio"),
        "header_only.wav": (wav_header_only(), "empty_audio"),
        "mp3_named.wav": (encode_audio(tone(1.0, rate=22_050), 22_050, "MP3"), "kept"),
        # (libsndfile writes no bytes at all for a FLAC of 0 frames; an Ogg Vorbis has its headers)
        "zero_seconds.ogg": (encode_audio(np.zeros((0, 1), np.float32), 16_000, "OGG"), "empty_audio"),
        # one hour at 1 kHz, 8-bit: a 3.6 MB file, refused from its header before any decoding
        "one_hour.wav": (encode_audio(tone(3600.0, rate=1000, freq=50.0), 1000, "WAV", "PCM_U8"), "too_long"),
        "eight_bit.wav": (encode_audio(tone(1.0, rate=8000), 8000, "WAV", "PCM_U8"), "kept"),
        "twenty_four_bit.wav": (encode_audio(tone(1.0, rate=48_000), 48_000, "WAV", "PCM_24"), "kept"),
        "six_channels.wav": (encode_audio(tone(1.0, rate=44_100, channels=6), 44_100, "WAV", "PCM_16"), "kept"),
        "nan_float.wav": (nan_float_wav(), "nonfinite_audio"),
        "silence.wav": (encode_audio(np.zeros((16_000, 1), np.float32), 16_000), "silent_audio"),
        "clipped.wav": (encode_audio(loud, 16_000), "clipped_audio"),
        "too_short.wav": (encode_audio(tone(0.02), 16_000), "too_short"),
        "not_audio.wav": (b"this is not audio at all, only text " * 20, "not_audio"),
        "empty.wav": (b"", "empty_file"),
    }
