"""A log-mel spectrogram front end built from convolution and matrix products.

The short-time Fourier transform is a strided 1-D convolution with windowed cosine and
sine kernels, so the front end runs inside the model, exports to any ONNX opset without
an STFT operator, and accepts recordings of any length.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Convert frequencies to the HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Invert `hz_to_mel`."""
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(sample_rate_hz: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Return triangular mel filters of shape (n_mels, n_fft // 2 + 1), peaks of height 1."""
    n_freqs = n_fft // 2 + 1
    bin_hz = np.linspace(0.0, sample_rate_hz / 2.0, n_freqs)
    edges_hz = mel_to_hz(np.linspace(0.0, hz_to_mel(np.array(sample_rate_hz / 2.0)), n_mels + 2))
    filters = np.zeros((n_mels, n_freqs))
    for m in range(n_mels):
        low, centre, high = edges_hz[m], edges_hz[m + 1], edges_hz[m + 2]
        rising = (bin_hz - low) / (centre - low)
        falling = (high - bin_hz) / (high - centre)
        filters[m] = np.clip(np.minimum(rising, falling), 0.0, None)
    return filters.astype(np.float32)


class LogMelSpectrogram(nn.Module):
    """Map waveforms (batch, samples) to log-mel spectrograms (batch, 1, n_mels, frames).

    Frames are taken without centring, so frames = 1 + (samples - n_fft) // hop_length;
    a waveform shorter than n_fft is rejected by the convolution.
    """

    def __init__(self, *, sample_rate_hz: int, n_fft: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        self.hop_length = hop_length
        n_freqs = n_fft // 2 + 1
        t = np.arange(n_fft)
        window = 0.5 - 0.5 * np.cos(2.0 * math.pi * t / n_fft)  # periodic Hann
        k = np.arange(n_freqs)[:, None]
        phase = 2.0 * math.pi * k * t[None, :] / n_fft
        kernels = np.concatenate([np.cos(phase) * window, -np.sin(phase) * window])
        self.register_buffer("dft_kernels", torch.from_numpy(kernels.astype(np.float32))[:, None, :])
        self.register_buffer("mel_filters", torch.from_numpy(mel_filterbank(sample_rate_hz, n_fft, n_mels)))
        self.n_freqs = n_freqs

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spectrum = nn.functional.conv1d(waveform.unsqueeze(1), self.dft_kernels, stride=self.hop_length)
        real, imag = spectrum[:, : self.n_freqs], spectrum[:, self.n_freqs :]
        power = real * real + imag * imag
        mel = torch.matmul(self.mel_filters, power)
        return torch.log(mel + 1e-6).unsqueeze(1)
