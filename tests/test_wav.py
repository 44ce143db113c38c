"""WAV reading in every encoding, resampling, and the loader's conversion rules.

Expected samples come from the values each test writes, scaled by hand, and resampled
signals are compared with the same sine evaluated at the new rate.
"""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from mmkd.config import AudioConfig
from mmkd.data import wav
from mmkd.data.loading import decode_audio


def write_wav(path: Path, data: bytes, *, tag: int, rate: int, channels: int, bits: int) -> Path:
    """A WAV file built chunk by chunk, so float encodings can be written too."""
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block_align, block_align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def pcm24_bytes(values: np.ndarray) -> bytes:
    """Little-endian 3-byte two's complement samples."""
    return b"".join(int(v).to_bytes(3, "little", signed=True) for v in values)


def sine(frequency: float, rate: int, frames: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * frequency * np.arange(frames) / rate)


@pytest.mark.parametrize(
    ("encoding", "tag", "bits", "data", "expected"),
    [
        ("pcm8", 1, 8, bytes([0, 128, 255]), [-1.0, 0.0, 127 / 128]),
        ("pcm16", 1, 16, struct.pack("<3h", -32768, 0, 16384), [-1.0, 0.0, 0.5]),
        ("pcm24", 1, 24, pcm24_bytes(np.array([-(1 << 23), 0, 1 << 22])), [-1.0, 0.0, 0.5]),
        ("pcm32", 1, 32, struct.pack("<3i", -(1 << 31), 0, 1 << 29), [-1.0, 0.0, 0.25]),
        ("float32", 3, 32, struct.pack("<3f", -0.75, 0.0, 0.5), [-0.75, 0.0, 0.5]),
        ("float64", 3, 64, struct.pack("<3d", -0.125, 0.0, 1.5), [-0.125, 0.0, 1.5]),
    ],
)
def test_read_samples_scales_every_encoding(tmp_path, encoding, tag, bits, data, expected):
    path = write_wav(tmp_path / "x.wav", data, tag=tag, rate=8000, channels=1, bits=bits)
    samples, header = wav.read_samples(path)
    assert header.encoding == encoding
    assert samples.shape == (3, 1)
    assert samples[:, 0].tolist() == pytest.approx(expected, abs=1e-7)


def test_read_samples_keeps_stereo_channels(tmp_path):
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as stream:
        stream.setnchannels(2)
        stream.setsampwidth(2)
        stream.setframerate(8000)
        stream.writeframes(struct.pack("<4h", 16384, -16384, 8192, 0))
    samples, header = wav.read_samples(path)
    assert header.channels == 2
    assert samples.tolist() == [[0.5, -0.5], [0.25, 0.0]]


def test_read_samples_rejects_a_law(tmp_path):
    path = write_wav(tmp_path / "alaw.wav", b"\x00\x01", tag=6, rate=8000, channels=1, bits=8)
    with pytest.raises(wav.WavError, match="unsupported WAV encoding format tag 6"):
        wav.read_samples(path)


@pytest.mark.parametrize(("source", "target", "frames"), [(44100, 8000, 44100), (16000, 8000, 12345), (11025, 8000, 12000), (8000, 22050, 8000)])
def test_resample_keeps_tones_in_band(source, target, frames):
    signal = sine(440, source, frames) + 0.4 * np.cos(2 * np.pi * 1000 * np.arange(frames) / source)
    out = wav.resample(signal, source, target)
    assert out.size == -(-frames * target // source)
    times = np.arange(out.size) / target
    expected = 0.5 * np.sin(2 * np.pi * 440 * times) + 0.4 * np.cos(2 * np.pi * 1000 * times)
    # The ends see zeros beyond the signal, so only the middle 80% is compared.
    middle = slice(out.size // 10, -(out.size // 10))
    assert np.abs(out[middle] - expected[middle]).max() < 1e-4


def test_resample_removes_tone_above_nyquist():
    # 6 kHz would fold to 2 kHz at 8 kHz without the low-pass filter.
    out = wav.resample(np.sin(2 * np.pi * 6000 * np.arange(44100) / 44100), 44100, 8000)
    middle = out[800:-800]
    assert np.sqrt(np.mean(middle**2)) < 1e-3


def test_resample_same_rate_is_identity():
    signal = sine(440, 8000, 100)
    assert np.array_equal(wav.resample(signal, 8000, 8000), signal.astype(np.float32))


def stereo_24_bit_44k(path: Path) -> Path:
    """One second of 440 Hz: full amplitude on the left, silence on the right."""
    left = np.round(sine(440, 44100, 44100) * 2 * (1 << 23) * 0.5).astype(np.int64)
    frames = np.stack([left, np.zeros_like(left)], axis=1).reshape(-1)
    return write_wav(path, pcm24_bytes(frames), tag=1, rate=44100, channels=2, bits=24)


def test_decode_audio_rejects_disallowed_conversions(tmp_path):
    path = stereo_24_bit_44k(tmp_path / "x.wav")
    with pytest.raises(ValueError) as info:
        decode_audio(path, AudioConfig())
    message = str(info.value)
    assert "the recording is pcm24, and data.audio.encodings accepts only pcm16" in message
    assert "the recording is 44100 Hz, expected 8000 Hz (set data.audio.resample: true" in message
    assert "the recording has 2 channels, expected 1 (set data.audio.downmix: true" in message


def test_decode_audio_converts_when_allowed(tmp_path):
    path = stereo_24_bit_44k(tmp_path / "x.wav")
    config = AudioConfig(encodings=["pcm16", "pcm24"], resample=True, downmix=True, max_seconds=1.0)
    samples = decode_audio(path, config)
    assert samples.shape == (8000,)
    # The mean of a full-amplitude channel and a silent one is the tone at half amplitude.
    expected = 0.25 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    assert np.abs(samples[800:-800] - expected[800:-800]).max() < 1e-4


def test_decode_audio_rejects_nan_samples(tmp_path):
    path = write_wav(tmp_path / "nan.wav", struct.pack("<3f", 0.1, float("nan"), 0.2), tag=3, rate=8000, channels=1, bits=32)
    with pytest.raises(ValueError, match="the recording has 1 NaN or infinite samples"):
        decode_audio(path, AudioConfig(encodings=["float32"]))


def test_recording_problems_empty_when_accepted():
    config = AudioConfig()
    assert wav.recording_problems(sample_rate_hz=8000, channels=1, encoding="pcm16", config=config) == []
