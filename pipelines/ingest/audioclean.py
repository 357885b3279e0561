"""Audio cleaning: verify by decoding, refuse what the header says is out of bounds, downmix to
mono, resample to 16 kHz (soxr), re-encode as 16-bit FLAC. Every refusal is an `AudioReject`
with a report reason:

- `empty_file` (0 bytes), `too_large` (over `data.max_audio_bytes`);
- `not_audio`: no format libsndfile knows (WAV, FLAC, Ogg Vorbis/Opus, MP3, AIFF, ...) reads it;
- `empty_audio`: a header with no samples (a 0-second file);
- `too_short` / `too_long`: duration outside `data.min_audio_s` .. `data.max_audio_s`, decided
  from the header where it tells (a 1-hour file is refused before any decoding);
- `truncated_audio`: fewer samples decode than the header announced, or the stream breaks off;
  `corrupt_audio`: the decoder fails otherwise;
- `nonfinite_audio`: NaN or infinite samples (a float file);
- `silent_audio`: digital silence, the peak under `data.audio_silence_dbfs`;
- `clipped_audio`: more than `data.max_clipped_fraction` of the samples at full scale.

Files are decoded as a content sniff (never by their name): MP3 bytes named `.wav` are read as
the MP3 they are. Any sample format (8/16/24/32-bit integer, float) and channel count is
accepted and converted.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from pipelines.config import SectionView
from pipelines.ingest.rejects import Reject

BLOCK_FRAMES = 1 << 16  # decoded a block at a time: memory stays at the mono result, not every channel
FULL_SCALE = 0.999  # |sample| at or above this counts as clipped (8-bit full scale is 127/128)
MAX_CHANNELS = 64


class AudioReject(Reject):
    """An audio clip that cannot be kept."""


@dataclass(frozen=True)
class AudioSpec(SectionView):
    """The `DataConfig` fields that audio cleaning reads: `AudioSpec.of(cfg.data)`."""

    audio_sample_rate: int
    min_audio_s: float
    max_audio_s: float
    max_audio_bytes: int
    audio_silence_dbfs: float
    max_clipped_fraction: float


@dataclass(frozen=True)
class CleanAudio:
    flac: bytes  # mono, spec.audio_sample_rate, 16-bit FLAC
    duration_s: float  # of the cleaned audio
    sample_rate: int  # original
    channels: int  # original
    format: str  # original container, e.g. WAV, FLAC, MP3
    subtype: str  # original sample format, e.g. PCM_16, PCM_24, FLOAT
    pcm_sha: str  # sha256 of the cleaned 16-bit samples: the exact-duplicate key


def _info(data: bytes, spec: AudioSpec) -> sf._SoundFileInfo:
    if not data:
        raise AudioReject("empty_file", "0 bytes")
    if len(data) > spec.max_audio_bytes:
        raise AudioReject("too_large", f"{len(data)} bytes > data.max_audio_bytes = {spec.max_audio_bytes}")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - libsndfile raises LibsndfileError / RuntimeError for non-audio
        # Never the bytes themselves in a detail: a manifest may name any file.
        raise AudioReject("not_audio", f"no audio format recognises these {len(data)} bytes") from e
    if info.samplerate <= 0 or not 0 < info.channels <= MAX_CHANNELS:
        raise AudioReject("corrupt_audio", f"{info.format} header: {info.samplerate} Hz, {info.channels} channels")
    return info


def _check_header(info: sf._SoundFileInfo, spec: AudioSpec) -> None:
    """Duration bounds from the header, before decoding."""
    if info.frames <= 0:
        raise AudioReject("empty_audio", f"{info.format} header with no samples (0 s)")
    seconds = info.frames / info.samplerate
    if seconds > spec.max_audio_s:
        raise AudioReject("too_long", f"{seconds:.1f} s > data.max_audio_s = {spec.max_audio_s}")
    if seconds < spec.min_audio_s:
        raise AudioReject("too_short", f"{seconds:.3f} s < data.min_audio_s = {spec.min_audio_s}")


def _decode_mono(data: bytes, info: sf._SoundFileInfo, spec: AudioSpec) -> tuple[np.ndarray, int]:
    """(mono float32 samples, samples at full scale in any channel), a block at a time."""
    blocks, clipped = [], 0
    limit = int(math.ceil(spec.max_audio_s * info.samplerate)) + 1  # a header that lied: stop decoding there
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            while sum(map(len, blocks)) < limit:
                block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    break
                clipped += int(np.count_nonzero(np.abs(block).max(axis=1) >= FULL_SCALE))
                blocks.append(block.mean(axis=1, dtype=np.float32))
    except Exception as e:  # noqa: BLE001 - decoders raise LibsndfileError, RuntimeError, ...
        lost = "lost sync" in str(e) or "truncat" in str(e).lower() or "end of file" in str(e).lower()
        raise AudioReject("truncated_audio" if lost else "corrupt_audio", f"{info.format}: {str(e)[:160]}") from e
    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if info.format != "MP3" and len(mono) < info.frames:  # an MP3's frame count is an estimate
        raise AudioReject("truncated_audio", f"{info.format}: {len(mono)} of {info.frames} samples decode")
    return mono, clipped


def _check_signal(mono: np.ndarray, clipped: int, info: sf._SoundFileInfo, spec: AudioSpec) -> None:
    bad = int(np.count_nonzero(~np.isfinite(mono)))
    if bad:
        raise AudioReject("nonfinite_audio", f"{bad} of {len(mono)} samples are NaN or infinite")
    seconds = len(mono) / info.samplerate
    if seconds > spec.max_audio_s:
        raise AudioReject("too_long", f"{seconds:.1f} s decoded > data.max_audio_s = {spec.max_audio_s}")
    if seconds < spec.min_audio_s:
        raise AudioReject("too_short", f"{seconds:.3f} s decoded < data.min_audio_s = {spec.min_audio_s}")
    peak = float(np.abs(mono).max())
    dbfs = 20 * math.log10(peak) if peak > 0 else -math.inf
    if dbfs < spec.audio_silence_dbfs:
        raise AudioReject("silent_audio", f"peak {dbfs:.1f} dBFS < data.audio_silence_dbfs = {spec.audio_silence_dbfs}")
    fraction = clipped / len(mono)
    if fraction > spec.max_clipped_fraction:
        raise AudioReject("clipped_audio", f"{fraction:.1%} of samples at full scale > "
                                           f"data.max_clipped_fraction = {spec.max_clipped_fraction}")


def to_pcm16(mono: np.ndarray) -> np.ndarray:
    """float samples -> 16-bit integers (clipped to full scale)."""
    return (np.clip(mono, -1.0, 1.0) * 32767).round().astype(np.int16)


def to_flac(pcm: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono FLAC bytes of int16 samples, written as they are (same samples, same bytes)."""
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def clean_audio(data: bytes, spec: AudioSpec) -> CleanAudio:
    """Raw bytes -> cleaned FLAC; raises AudioReject with the reason."""
    info = _info(data, spec)
    _check_header(info, spec)
    mono, clipped = _decode_mono(data, info, spec)
    _check_signal(mono, clipped, info, spec)
    if info.samplerate != spec.audio_sample_rate:
        mono = soxr.resample(mono, info.samplerate, spec.audio_sample_rate, quality="HQ").astype(np.float32)
    pcm = to_pcm16(mono)
    return CleanAudio(
        flac=to_flac(pcm, spec.audio_sample_rate),
        duration_s=round(len(mono) / spec.audio_sample_rate, 4),
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
        format=str(info.format),
        subtype=str(info.subtype),
        pcm_sha=hashlib.sha256(pcm.astype("<i2").tobytes()).hexdigest(),
    )
