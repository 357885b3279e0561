"""Spoken captions and questions for the synthetic set: espeak-ng, with several voices, speeds
and pitches, leading and trailing pauses and background noise, so that two utterances of one
text are never the same waveform.

Deterministic: espeak-ng gives the same samples for the same text and settings, and everything
random (voice, speed, pitch, pauses, noise) comes from the caller's seeded generator. espeak-ng
runs as a subprocess (no shell; the text is one argument); a `Speaker` keeps what it has said
(`(text, voice)` -> samples), because the synthetic set's questions and captions repeat a small
vocabulary: most utterances are a cache hit plus fresh noise.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
from dataclasses import dataclass

import numpy as np
import soundfile as sf

# espeak-ng's own English voices (no MBROLA data needed), some with a female/male variant
# Few enough settings (6 x 3 x 2 = 36) that repeated texts (the questions) are mostly cache hits.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+f2")
SPEEDS = (140, 165, 190)  # words per minute (espeak-ng's default: 175)
PITCHES = (40, 60)  # 0-99 (default 50)
RATE = 22_050  # espeak-ng's output rate
TIMEOUT_S = 60.0


class SpeechError(RuntimeError):
    """espeak-ng missing or failing; the message says what to do."""


@dataclass(frozen=True)
class Voice:
    name: str
    speed: int
    pitch: int

    @classmethod
    def pick(cls, rng: np.random.Generator) -> Voice:
        return cls(str(rng.choice(VOICES)), int(rng.choice(SPEEDS)), int(rng.choice(PITCHES)))


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise SpeechError("espeak-ng is not installed: the synthetic spoken set needs it "
                          "(Debian/Ubuntu: apt-get install espeak-ng), or set data.synth_audio: false")
    return path


def say(text: str, voice: Voice, binary: str | None = None) -> np.ndarray:
    """espeak-ng's rendering of `text`: float32 mono samples at `RATE`."""
    cmd = [binary or espeak_binary(), "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout",
           text]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT_S, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SpeechError(f"espeak-ng failed on {text!r} with voice {voice}: "
                          f"{e.stderr.decode(errors='replace').strip()[:200]}") from e
    except subprocess.TimeoutExpired as e:
        raise SpeechError(f"espeak-ng took over {TIMEOUT_S:.0f} s on {text!r}") from e
    samples, rate = sf.read(io.BytesIO(out), dtype="float32")
    if rate != RATE or samples.ndim != 1 or not len(samples):
        raise SpeechError(f"espeak-ng gave {rate} Hz, shape {samples.shape} for {text!r}; expected mono {RATE} Hz")
    return samples


def background(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of room noise, unit RMS: coloured noise (white to brown, a random spectral
    tilt, shaped in the frequency domain: one FFT) and a mains-like hum."""
    size = 1 << max(1, (n - 1).bit_length())  # a power of two: an FFT of a length with a large prime factor is slow
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1 / RATE)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum * freqs ** -rng.uniform(0.0, 1.0), size)[:n]
    noise /= max(float(np.std(noise)), 1e-9)
    hum = np.sin(2 * np.pi * rng.uniform(50, 120) * np.arange(n) / RATE + rng.uniform(0, 2 * np.pi))
    mix = noise + hum * rng.uniform(0, 0.5)
    return mix / max(float(np.sqrt(np.mean(mix**2))), 1e-9)


def noisy(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Speech with 0.1-0.4 s of pause either side, background noise at 12-30 dB SNR, and a random
    gain; float32, peak under full scale."""
    pad = [np.zeros(int(rng.uniform(0.1, 0.4) * RATE), np.float32) for _ in range(2)]
    x = np.concatenate([pad[0], speech, pad[1]]).astype(np.float64)
    rms = float(np.sqrt(np.mean(speech.astype(np.float64) ** 2))) or 1e-3
    snr_db = rng.uniform(12, 30)
    x += background(len(x), rng) * rms / 10 ** (snr_db / 20)
    x *= rng.uniform(0.3, 0.9) / max(float(np.abs(x).max()), 1e-9)
    return x.astype(np.float32)


class Speaker:
    """`utterance(text, rng)`: a voice drawn from `rng`, espeak-ng's samples (cached), fresh noise.
    Safe to share between threads."""

    def __init__(self):
        self.binary = espeak_binary()
        self.cache: dict[tuple[str, Voice], np.ndarray] = {}
        self.lock = threading.Lock()
        self.calls = 0  # espeak-ng runs (cache misses)

    def clean(self, text: str, voice: Voice) -> np.ndarray:
        with self.lock:
            got = self.cache.get((text, voice))
        if got is None:
            got = say(text, voice, self.binary)
            with self.lock:
                self.cache[(text, voice)] = got
                self.calls += 1
        return got

    def utterance(self, text: str, rng: np.random.Generator) -> tuple[np.ndarray, Voice]:
        voice = Voice.pick(rng)
        return noisy(self.clean(text, voice), rng), voice
