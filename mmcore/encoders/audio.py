"""Audio encoder: log-mel features, convolutional subsampling and a transformer (Whisper's
encoder design: Radford et al. 2022, "Robust speech recognition via large-scale weak supervision").

`AudioEncoder(cfg, out_dim)(waveform (B, T), lengths (B,))` -> `AudioEncoding(tokens (B, N, D),
pooled (B, D), mask (B, N))`, in the model width D, like the image encoder's `(tokens, pooled)`
plus the mask of valid tokens (True = valid) for variable-length audio: N = ceil(F / s) for F
spectrogram frames and s = `cfg.subsample`, pooled = the mean of the valid tokens. Padding never
changes a valid output: frames are taken without centring (no frame reaches past a clip's end),
padded frames and tokens are zeroed before each convolution (exactly what the convolution's own
zero padding gives an unpadded clip) and masked out of attention and the pooling.

The mel filterbank is built here from plain torch ops (Slaney's mel scale and area normalisation,
as librosa's default and Whisper use); the spectrogram is `torch.stft` with a periodic Hann window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class AudioEncoderConfig:
    sample_rate: int = 16_000
    n_fft: int = 400  # 25 ms windows
    hop_length: int = 160  # 10 ms hop: 100 frames a second
    # Frames per token: 2 (Whisper: one stride-2 convolution, 50 tokens a second) or 4 (a second
    # stride-2 convolution, 25 tokens a second, as Conformer's front-end subsamples): half the
    # tokens for the transformer to run over and for the decoder to search for each word.
    subsample: int = 2
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    num_layers: int = 4
    num_heads: int = 6
    hidden_dim: int = 384
    mlp_dim: int = 1536
    dropout: float = 0.0


PRESETS = {
    "debug": AudioEncoderConfig(n_mels=40, num_layers=2, num_heads=4, hidden_dim=128, mlp_dim=256, subsample=4),
    "small": AudioEncoderConfig(num_layers=4, num_heads=6, hidden_dim=384, mlp_dim=1536),  # Whisper-tiny's encoder
    "base": AudioEncoderConfig(num_layers=6, num_heads=8, hidden_dim=512, mlp_dim=2048),  # Whisper-base's encoder
}


def audio_encoder_config(preset: str, **overrides) -> AudioEncoderConfig:
    """A named size (`debug` | `small` | `base`) with fields replaced by `overrides`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown audio encoder preset {preset!r}; use one of {', '.join(PRESETS)}")
    return AudioEncoderConfig(**{**PRESETS[preset].__dict__, **overrides})


class AudioEncoding(NamedTuple):
    tokens: Tensor  # (B, N, D)
    pooled: Tensor  # (B, D)
    mask: Tensor  # (B, N) bool, True = a valid token


def hz_to_mel(hz: Tensor) -> Tensor:
    """Slaney's mel scale: linear to 1 kHz (3 mels per 200 Hz), logarithmic above."""
    linear = hz * 3.0 / 200.0
    log = 15.0 + torch.log(torch.clamp(hz, min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log, linear)


def mel_to_hz(mel: Tensor) -> Tensor:
    linear = mel * 200.0 / 3.0
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log, linear)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """`(n_fft // 2 + 1, n_mels)` triangular filters, equally spaced in mel, each scaled to unit
    area in Hz (Slaney); multiply a power spectrum `(..., freqs)` by it."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64))
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - left) / (centre - left)
    falling = (right - freqs[None]) / (right - centre)
    tri = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (tri * (2.0 / (right - left))).T.float()


class LogMel(nn.Module):
    """Waveforms -> Whisper-style log-mel features: log10 power, floored 8 decades (80 dB) under
    each clip's peak, scaled to about [-1, 1]."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        fb = mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate, cfg.f_min, cfg.f_max)
        self.register_buffer("filters", fb, persistent=False)

    def frames(self, lengths: Tensor) -> Tensor:
        """Frames whose window lies inside each clip (at least one: short clips are zero-padded)."""
        return torch.clamp((lengths - self.n_fft) // self.hop + 1, min=1)

    def mel_power(self, waveform: Tensor) -> Tensor:
        """`(B, T)` -> mel power `(B, F, n_mels)`, F = frames of the whole (padded) batch."""
        if waveform.shape[-1] < self.n_fft:
            waveform = F.pad(waveform, (0, self.n_fft - waveform.shape[-1]))
        spec = torch.stft(waveform.float(), self.n_fft, self.hop, window=self.window, center=False,
                          return_complex=True)
        return (spec.abs() ** 2).transpose(1, 2) @ self.filters

    def forward(self, waveform: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, T)`, `(B,)` samples -> `(features (B, F, n_mels), valid frames (B, F) bool)`."""
        logmel = torch.log10(torch.clamp(self.mel_power(waveform), min=1e-10))
        valid = torch.arange(logmel.shape[1], device=logmel.device)[None] < self.frames(lengths)[:, None]
        peak = logmel.masked_fill(~valid[..., None], -torch.inf).amax(dim=(1, 2), keepdim=True)
        logmel = torch.maximum(logmel, peak - 8.0)
        return (logmel + 4.0) / 4.0, valid


def sinusoids(length: int, dim: int, device=None) -> Tensor:
    """`(length, dim)` fixed sinusoidal positions (no learnt table: any clip length works)."""
    scales = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=device) / max(dim // 2 - 1, 1))
    angles = torch.arange(length, device=device)[:, None] * scales[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class AudioEncoder(nn.Module):
    """Log-mel -> 1-D convolutions (the second with stride 2, and a third with stride 2 when
    `cfg.subsample` is 4) -> transformer -> projection to `out_dim`."""

    def __init__(self, cfg: AudioEncoderConfig, out_dim: int):
        super().__init__()
        if cfg.subsample not in (2, 4):
            raise ValueError(f"audio encoder subsample={cfg.subsample}: use 2 (50 tokens a second) or 4 (25)")
        self.cfg = cfg
        self.features = LogMel(cfg)
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.hidden_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.hidden_dim, cfg.hidden_dim, kernel_size=3, stride=2, padding=1)
        if cfg.subsample == 4:  # registered only then: subsample-2 checkpoints keep their keys
            self.conv3 = nn.Conv1d(cfg.hidden_dim, cfg.hidden_dim, kernel_size=3, stride=2, padding=1)
        layer = nn.TransformerEncoderLayer(cfg.hidden_dim, cfg.num_heads, cfg.mlp_dim, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.proj = nn.Identity() if cfg.hidden_dim == out_dim else nn.Linear(cfg.hidden_dim, out_dim)

    def forward(self, waveform: Tensor, lengths: Tensor | None = None) -> AudioEncoding:
        """waveform `(B, T)` at `cfg.sample_rate`, lengths `(B,)` valid samples (None: all T)."""
        if lengths is None:
            lengths = torch.full((waveform.shape[0],), waveform.shape[-1], device=waveform.device)
        feats, valid = self.features(waveform, lengths)  # (B, F, M), (B, F)
        x = feats.masked_fill(~valid[..., None], 0.0).transpose(1, 2)  # (B, M, F)
        x = F.gelu(self.conv1(x)).masked_fill(~valid[:, None], 0.0)
        x = F.gelu(self.conv2(x))  # (B, D, ceil(F / 2))
        mask = valid[:, ::2]  # token i sees frames 2i-1 .. 2i+1: valid when frame 2i is
        if self.cfg.subsample == 4:
            x = F.gelu(self.conv3(x.masked_fill(~mask[:, None], 0.0)))  # (B, D, ceil(F / 4))
            mask = mask[:, ::2]
        x = x.transpose(1, 2)  # (B, N, D)
        x = x + sinusoids(x.shape[1], x.shape[2], x.device).to(x.dtype)
        x = self.norm(self.transformer(x, src_key_padding_mask=~mask))
        tokens = self.proj(x).masked_fill(~mask[..., None], 0.0)
        pooled = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return AudioEncoding(tokens, pooled, mask)
