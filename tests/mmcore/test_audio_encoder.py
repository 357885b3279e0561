"""The audio encoder: shapes, masking (padding never changes a valid output), gradients, presets,
and the log-mel features against a reference computed another way (an explicit DFT and mel
triangles written out from their definition, on pure tones)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmcore.encoders.audio import AudioEncoder, LogMel, audio_encoder_config, mel_filterbank

SR = 16_000


def _tone(seconds: float, freq: float = 440.0, seed: int = 0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(len(t), generator=g)


@pytest.fixture(scope="module", params=[2, 4], ids=["subsample2", "subsample4"])
def encoder(request) -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder(audio_encoder_config("debug", subsample=request.param), out_dim=96).eval()


def test_shapes_and_mask_of_a_variable_length_batch(encoder):
    lengths = torch.tensor([SR, SR // 2, 300])  # 1 s, 0.5 s, and shorter than one window
    wave = torch.zeros(3, SR)
    for i, n in enumerate(lengths.tolist()):
        wave[i, :n] = _tone(n / SR, seed=i)
    out = encoder(wave, lengths)
    s = encoder.cfg.subsample
    frames = (SR - 400) // 160 + 1  # 98 frames of 25 ms every 10 ms
    assert out.tokens.shape == (3, math.ceil(frames / s), 96) and out.pooled.shape == (3, 96)
    valid = [math.ceil(((n - 400) // 160 + 1) / s) if n >= 400 else 1 for n in lengths.tolist()]
    assert out.mask.sum(dim=1).tolist() == valid == {2: [49, 24, 1], 4: [25, 12, 1]}[s]
    assert torch.isfinite(out.tokens).all() and (out.tokens[~out.mask] == 0).all()


def test_padding_never_changes_the_valid_outputs(encoder):
    """Each clip alone, unpadded, gives the tokens and pooled vector it gives inside a batch whose
    padding holds loud noise."""
    clips = [_tone(0.73, 300.0, seed=1), _tone(0.41, 800.0, seed=2), _tone(1.2, 520.0, seed=3)]
    longest = max(len(c) for c in clips)
    batch = torch.randn(len(clips), longest) * 0.9  # garbage wherever a clip has ended
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    lengths = torch.tensor([len(c) for c in clips])
    with torch.no_grad():
        together = encoder(batch, lengths)
        for i, c in enumerate(clips):
            alone = encoder(c[None], torch.tensor([len(c)]))
            n = int(alone.mask.sum())
            assert int(together.mask[i].sum()) == n == alone.tokens.shape[1]
            torch.testing.assert_close(together.tokens[i, :n], alone.tokens[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(together.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-4)
    # and the garbage does matter where it is valid audio: the check above is not vacuous
    with torch.no_grad():
        full = encoder(batch, torch.full((3,), longest))
    assert not torch.allclose(full.pooled[1], together.pooled[1], atol=1e-3)


@pytest.mark.parametrize("subsample", [2, 4])
def test_gradients_reach_every_parameter_and_no_padded_sample(subsample):
    torch.manual_seed(0)
    enc = AudioEncoder(audio_encoder_config("debug", subsample=subsample), out_dim=64).train()
    wave = torch.stack([_tone(0.6, seed=4), torch.cat([_tone(0.3, seed=5), torch.zeros(int(0.3 * SR))])])
    wave.requires_grad_(True)
    out = enc(wave, torch.tensor([int(0.6 * SR), int(0.3 * SR)]))
    (out.pooled.pow(2).sum() + out.tokens.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert wave.grad[1, int(0.3 * SR):].abs().max() == 0  # past its length a clip does not count
    assert wave.grad[1, : int(0.3 * SR) - 400].abs().max() > 0


def test_presets_are_sized_as_named():
    sizes = {}
    for name in ("debug", "small", "base"):
        cfg = audio_encoder_config(name)
        sizes[name] = sum(p.numel() for p in AudioEncoder(cfg, cfg.hidden_dim).parameters())
    small = audio_encoder_config("small")
    assert (small.num_layers, small.hidden_dim, small.n_mels) == (4, 384, 80)  # Whisper-tiny's encoder
    assert sizes["debug"] < 1e6 < sizes["small"] < sizes["base"]
    assert 7e6 < sizes["small"] < 9e6  # Whisper-tiny's encoder: ~8M (without its learnt positions)
    assert audio_encoder_config("small", num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match="use one of debug, small, base"):
        audio_encoder_config("huge")
    assert (audio_encoder_config("debug").subsample, small.subsample) == (4, 2)  # 25 and 50 tokens a second
    with pytest.raises(ValueError, match="subsample=3: use 2"):
        AudioEncoder(audio_encoder_config("debug", subsample=3), 64)


def test_a_config_saved_before_subsample_existed_loads_as_subsample_2():
    """Checkpoints store the model config as a dict; one written before `subsample` existed has no
    such key and must rebuild the encoder it was trained with (no conv3)."""
    from mmcore.model import FusionModelConfig, model_config

    saved = model_config("debug", audio_encoder="debug").to_dict()
    del saved["audio"]["subsample"]
    cfg = FusionModelConfig.from_dict(saved)
    assert cfg.audio.subsample == 2
    assert not hasattr(AudioEncoder(cfg.audio, 64), "conv3")


# ----------------------------------------------------------------------------- the features


def _slaney_mel(hz: float) -> float:
    """Slaney's mel scale, written out from its definition (as in the Auditory Toolbox)."""
    return hz / (200 / 3) if hz < 1000 else 15 + math.log(hz / 1000) / (math.log(6.4) / 27)


def _slaney_hz(mel: float) -> float:
    return mel * (200 / 3) if mel < 15 else 1000 * math.exp((mel - 15) * math.log(6.4) / 27)


def _reference_mel_power(x: np.ndarray, n_fft: int, n_mels: int, sr: int) -> np.ndarray:
    """Mel power of the first frame of `x`: a direct DFT sum (no FFT) under a periodic Hann
    window, then unit-area triangles between mel-equispaced edges, one frequency at a time."""
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    frame = x[:n_fft].astype(np.float64) * window
    power = [abs(np.sum(frame * np.exp(-2j * np.pi * k * n / n_fft))) ** 2 for k in range(n_fft // 2 + 1)]
    top = _slaney_mel(sr / 2)
    edges = [_slaney_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros(n_mels)
    for m in range(n_mels):
        lo, mid, hi = edges[m : m + 3]
        for k, p in enumerate(power):
            f = k * sr / n_fft
            weight = max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
            out[m] += p * weight * 2 / (hi - lo)
    return out


@pytest.mark.parametrize("freq", [250.0, 1000.0, 3125.0, 6010.0])
def test_mel_power_of_a_pure_tone_matches_a_direct_dft_and_the_slaney_definition(freq):
    cfg = audio_encoder_config("debug")
    x = np.sin(2 * np.pi * freq * np.arange(cfg.n_fft * 2) / SR)
    got = LogMel(cfg).mel_power(torch.tensor(x, dtype=torch.float32)[None])[0, 0].double().numpy()
    want = _reference_mel_power(x, cfg.n_fft, cfg.n_mels, SR)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * want.max())
    centres = [_slaney_hz(_slaney_mel(SR / 2) * (m + 1) / (cfg.n_mels + 1)) for m in range(cfg.n_mels)]
    assert abs(centres[int(got.argmax())] - freq) < 0.1 * freq + 100  # the energy is in the tone's band


def test_filterbank_triangles_have_unit_area_and_log_mel_is_floored_80_db_under_the_peak():
    fb = mel_filterbank(400, 40, SR)
    assert fb.shape == (201, 40) and (fb >= 0).all()
    areas = fb.sum(dim=0) * (SR / 400)  # Riemann sum over the bins, in Hz
    assert torch.allclose(areas[5:], torch.ones(35), atol=0.12)  # narrow low bands are sampled coarsely
    cfg = audio_encoder_config("debug")
    quiet_then_loud = torch.cat([1e-7 * _tone(0.2), _tone(0.3)])[None]
    feats, valid = LogMel(cfg)(quiet_then_loud, torch.tensor([quiet_then_loud.shape[1]]))
    assert valid.all() and feats.max() - feats.min() == pytest.approx(8.0 / 4.0, abs=1e-5)
