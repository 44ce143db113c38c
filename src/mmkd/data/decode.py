"""Decoding one image or recording into the arrays a model takes, without torch.

The training data loader and `mmkd predict` both decode through these functions, so a
deployed model gets exactly the preprocessing it was trained with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mmkd.config import AudioConfig, ImageConfig
from mmkd.data import wav

# PIL modes of 16-bit greyscale images, which `Image.convert("L")` would clip.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(path: Path, config: ImageConfig) -> np.ndarray:
    """Read an image as float32 (channels, size, size), normalised by the config's mean and std.

    Palette, CMYK and alpha images go through PIL's conversion to greyscale or RGB (alpha
    is dropped). 16-bit greyscale keeps its precision: it is scaled by 1/65535 rather
    than clipped to 8 bits. An image whose header declares more than
    `config.max_pixels` pixels is rejected before its pixels are read.

    Raises:
        ValueError: The image is over the pixel limit.
        OSError: The image is truncated or does not decode.
    """
    with Image.open(path) as image:
        width, height = image.size
        if width * height > config.max_pixels:
            raise ValueError(
                f"the image declares {width}x{height} = {width * height} pixels, above "
                f"data.image.max_pixels = {config.max_pixels}"
            )
        image.load()
        if image.mode in _WIDE_GREY_MODES:
            grey = np.asarray(image, dtype=np.float32) / 65535.0
            array = np.clip(grey, 0.0, 1.0)[None]
            if config.channels == 3:
                array = np.repeat(array, 3, axis=0)
            converted = None
        else:
            converted = image.convert("L" if config.channels == 1 else "RGB")
    if converted is None:
        if array.shape[1:] != (config.size, config.size):
            resized = [
                np.asarray(Image.fromarray(plane).resize((config.size, config.size), Image.Resampling.BILINEAR))
                for plane in array
            ]
            array = np.stack(resized).astype(np.float32)
    else:
        if converted.size != (config.size, config.size):
            converted = converted.resize((config.size, config.size), Image.Resampling.BILINEAR)
        array = np.asarray(converted, dtype=np.float32) / 255.0
        array = array[None] if config.channels == 1 else array.transpose(2, 0, 1)
    return (array - config.mean) / config.std


def decode_audio(path: Path, config: AudioConfig) -> np.ndarray:
    """Read a WAV file as mono float32 samples at the config's rate, padded or centre-cropped.

    The rules are those of the validate stage (`mmkd.data.wav.recording_problems`): an
    encoding, rate or channel count that the config does not accept is an error, and an
    accepted one is converted (scaled to [-1, 1], resampled, channels averaged).

    Raises:
        ValueError: The recording is corrupt, truncated, empty, contains NaN or infinite
            samples, or is not accepted by `config`. The message names the reason.
    """
    samples, header = wav.read_samples(path)
    problems = wav.recording_problems(
        sample_rate_hz=header.sample_rate_hz, channels=header.channels, encoding=header.encoding, config=config
    )
    if problems:
        raise ValueError("; ".join(f"the recording {reason}" for _, reason in problems))
    nonfinite = int(samples.size - np.count_nonzero(np.isfinite(samples)))
    if nonfinite:
        raise ValueError(f"the recording has {nonfinite} NaN or infinite samples")
    mono = samples.mean(axis=1) if header.channels > 1 else samples[:, 0]
    mono = wav.resample(mono, header.sample_rate_hz, config.sample_rate_hz)
    target = config.num_samples
    if mono.size > target:
        start = (mono.size - target) // 2
        return mono[start : start + target]
    return np.pad(mono, (0, target - mono.size))
