"""Audio front-ends computed with torch (torchaudio does not install beside the CPU torch wheel here)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from harmonia.extras import require


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy) from ``orig_rate`` to ``new_rate`` Hz."""
    if orig_rate == new_rate:
        return wave.astype(np.float32)
    g = math.gcd(orig_rate, new_rate)
    resample_poly = require("scipy.signal", "resampling audio").resample_poly
    return resample_poly(wave.astype(np.float64), new_rate // g, orig_rate // g).astype(np.float32)


def _hz_to_mel(f: Tensor | float) -> Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def _mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular filters on the HTK mel scale, m = 2595·log10(1 + f/700); shape [n_mels, n_fft//2 + 1]."""
    f_max = sample_rate / 2 if f_max is None else f_max
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_points = torch.linspace(
        _hz_to_mel(f_min).item(), _hz_to_mel(f_max).item(), n_mels + 2, dtype=torch.float64
    )
    hz = _mel_to_hz(mel_points)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (bins[None, :] - lower) / (center - lower)
    falling = (upper - bins[None, :]) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel_spectrogram(
    waves: Tensor,
    sample_rate: int,
    n_mels: int = 40,
    win_seconds: float = 0.025,
    hop_seconds: float = 0.010,
    normalize: bool = True,
) -> Tensor:
    """Log-mel spectrogram of a batch of waveforms [N, samples] -> [N, n_mels, frames].

    Power STFT (Hann window, 25 ms / 10 ms), mel filterbank, log(· + 1e-6), then, as the TPAMI recipe does
    for its spectrograms, a per-clip z-normalisation.
    """
    win = int(round(win_seconds * sample_rate))
    hop = int(round(hop_seconds * sample_rate))
    n_fft = 1 << (win - 1).bit_length()
    spec = (
        torch.stft(
            waves.float(),
            n_fft=n_fft,
            hop_length=hop,
            win_length=win,
            window=torch.hann_window(win),
            center=True,
            return_complex=True,
        )
        .abs()
        .pow(2)
    )
    mel = torch.einsum("mf,nft->nmt", mel_filterbank(n_mels, n_fft, sample_rate), spec)
    logmel = torch.log(mel + 1e-6)
    if normalize:
        mean = logmel.mean(dim=(1, 2), keepdim=True)
        std = logmel.std(dim=(1, 2), keepdim=True).clamp_min(1e-5)
        logmel = (logmel - mean) / std
    return logmel


def add_noise_at_snr(
    wave: np.ndarray, snr_db: float, rng: np.random.Generator, signal_power: float
) -> np.ndarray:
    """Add white Gaussian noise so that 10·log10(P_signal / P_noise) = ``snr_db``."""
    noise_power = signal_power / (10.0 ** (snr_db / 10.0))
    return (wave + rng.normal(0.0, math.sqrt(noise_power), size=wave.shape)).astype(np.float32)
