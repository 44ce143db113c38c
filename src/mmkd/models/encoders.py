"""ResNet-style convolutional encoders for images and log-mel spectrograms."""

from __future__ import annotations

import torch
from torch import nn

from mmkd.config import AudioConfig, EncoderConfig
from mmkd.models.audio import LogMelSpectrogram


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity or 1x1 shortcut (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """A stem convolution, stages of basic blocks (each later stage halves the resolution
    and doubles the channels), global average pooling and a linear map to `embed_dim`."""

    def __init__(self, in_channels: int, config: EncoderConfig, embed_dim: int, *, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, config.width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(config.width),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        channels = config.width
        for stage, count in enumerate(config.blocks):
            out_channels = config.width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Linear(channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.proj(x.mean(dim=(2, 3)))


class AudioEncoder(nn.Module):
    """Log-mel front end, input batch norm and a ResNet encoder over the spectrogram."""

    def __init__(self, audio: AudioConfig, config: EncoderConfig, embed_dim: int) -> None:
        super().__init__()
        self.front_end = LogMelSpectrogram(
            sample_rate_hz=audio.sample_rate_hz, n_fft=audio.n_fft, hop_length=audio.hop_length, n_mels=audio.n_mels
        )
        self.norm = nn.BatchNorm2d(1)
        self.encoder = ResNetEncoder(1, config, embed_dim, stem_stride=2)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.norm(self.front_end(waveform)))
