"""WAV files of every common encoding, and the rules that decide which recordings are usable.

The `wave` module of the standard library reads PCM only, so the RIFF chunks are walked
here and the samples read with numpy: 8-, 16-, 24- and 32-bit PCM and 32- and 64-bit IEEE
float. The validate stage and the loader both call `recording_problems`, so a recording
that validation rejects can never reach training through the loader.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mmkd.config import AudioConfig

ENCODINGS = ("pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64")

FORMAT_PCM = 1
FORMAT_IEEE_FLOAT = 3

_READ_BLOCK_BYTES = 1 << 20
# Kaiser window shape of the resampling filter: about 86 dB of stop-band attenuation.
_KAISER_BETA = 8.6


class WavError(ValueError):
    """A WAV file that cannot be read, with the reason in its message."""


@dataclass(frozen=True)
class WavHeader:
    """The facts of a WAV file's `fmt ` and `data` chunks.

    Attributes:
        format_tag: 1 for PCM, 3 for IEEE float; other values are not read.
        channels: Interleaved channels per frame.
        sample_rate_hz: Frames per second.
        bits: Bits per sample.
        data_offset: Byte offset of the first sample.
        data_bytes: Length of the data chunk as its header declares it.
        available_bytes: Bytes the file contains from `data_offset` to its end.
    """

    format_tag: int
    channels: int
    sample_rate_hz: int
    bits: int
    data_offset: int
    data_bytes: int
    available_bytes: int

    @property
    def encoding(self) -> str:
        """The sample encoding, such as "pcm16" or "float32"."""
        if self.format_tag == FORMAT_PCM:
            return f"pcm{self.bits}"
        if self.format_tag == FORMAT_IEEE_FLOAT:
            return f"float{self.bits}"
        return f"format tag {self.format_tag}"

    @property
    def frame_bytes(self) -> int:
        return self.channels * ((self.bits + 7) // 8)

    @property
    def frames(self) -> int:
        """Frames the data chunk declares."""
        return self.data_bytes // self.frame_bytes

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate_hz

    def dtype(self) -> np.dtype:
        """Return the numpy type of one sample, or raise `WavError` for an unreadable encoding."""
        if self.encoding not in ENCODINGS:
            raise WavError(
                f"unsupported WAV encoding {self.encoding} ({self.bits}-bit); "
                f"readable encodings: {', '.join(ENCODINGS)}"
            )
        if self.encoding == "pcm24":
            # Three bytes per sample are widened by hand in `_to_float`.
            return np.dtype("u1")
        return np.dtype({"pcm8": "u1", "pcm16": "<i2", "pcm32": "<i4", "float32": "<f4", "float64": "<f8"}[self.encoding])


def read_header(stream: BinaryIO) -> WavHeader:
    """Walk the RIFF chunks up to `data` and return the header facts.

    A data chunk longer than the file is not an error here, so that a caller can report
    the declared duration; `check_complete` rejects it.

    Raises:
        WavError: The file is not RIFF/WAVE, a chunk is missing or the format is corrupt.
    """
    riff = stream.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise WavError(f"corrupt WAV header: expected 'RIFF....WAVE', found {riff[:12]!r}")
    fmt: tuple[int, int, int, int] | None = None
    while True:
        chunk = stream.read(8)
        if len(chunk) < 8:
            raise WavError("corrupt WAV header: no 'data' chunk" if fmt else "corrupt WAV header: no 'fmt ' chunk")
        name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if name == b"fmt ":
            body = stream.read(size)
            if size < 16 or len(body) < 16:
                raise WavError(f"corrupt WAV header: 'fmt ' chunk of {len(body)} bytes, expected at least 16")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if channels < 1 or rate < 1 or bits < 1:
                raise WavError(f"corrupt WAV header: {channels} channels, {rate} Hz, {bits}-bit samples")
            fmt = (tag, channels, rate, bits)
            stream.seek(size % 2, os.SEEK_CUR)
        elif name == b"data":
            if fmt is None:
                raise WavError("corrupt WAV header: 'data' chunk before the 'fmt ' chunk")
            offset = stream.tell()
            available = stream.seek(0, os.SEEK_END) - offset
            return WavHeader(*fmt, data_offset=offset, data_bytes=size, available_bytes=available)
        else:
            # Chunks are padded to an even length.
            stream.seek(size + size % 2, os.SEEK_CUR)


def check_complete(header: WavHeader) -> None:
    """Raise `WavError` when the data chunk is cut short or contains no frame."""
    if header.available_bytes < header.data_bytes:
        raise WavError(
            f"truncated WAV: the data chunk declares {header.data_bytes} bytes but the file "
            f"contains only {header.available_bytes}"
        )
    if header.data_bytes < header.frame_bytes:
        raise WavError("the WAV data chunk contains no samples")


def iter_blocks(path: Path, header: WavHeader, *, block_bytes: int = _READ_BLOCK_BYTES) -> Iterator[np.ndarray]:
    """Yield the samples as float64 arrays of shape (frames, channels), block by block.

    PCM samples are divided by their full scale (2^(bits-1)), so they lie in [-1, 1);
    float samples are returned as stored, NaN and infinities included.
    """
    dtype = header.dtype()
    frame_bytes = header.frame_bytes
    step = max(frame_bytes, block_bytes - block_bytes % frame_bytes)
    remaining = header.data_bytes - header.data_bytes % frame_bytes
    with open(path, "rb") as stream:
        stream.seek(header.data_offset)
        while remaining > 0:
            raw = stream.read(min(step, remaining))
            if not raw:
                return
            raw = raw[: len(raw) - len(raw) % frame_bytes]
            remaining -= len(raw)
            yield _to_float(np.frombuffer(raw, dtype=dtype), header).reshape(-1, header.channels)


def read_samples(path: Path) -> tuple[np.ndarray, WavHeader]:
    """Read a whole WAV file as float32 (frames, channels) samples and its header.

    Raises:
        WavError: The file is corrupt, truncated, empty or of an unreadable encoding.
    """
    with open(path, "rb") as stream:
        header = read_header(stream)
    check_complete(header)
    header.dtype()
    blocks = list(iter_blocks(path, header))
    return np.concatenate(blocks).astype(np.float32), header


def _to_float(values: np.ndarray, header: WavHeader) -> np.ndarray:
    encoding = header.encoding
    if encoding.startswith("float"):
        return values.astype(np.float64)
    if encoding == "pcm24":
        triples = values.reshape(-1, 3).astype(np.int32)
        values = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
    elif encoding == "pcm8":
        # 8-bit WAV samples are unsigned, centred on 128.
        values = values.astype(np.int64) - 128
    return values.astype(np.float64) / float(1 << (header.bits - 1))


def recording_problems(
    *, sample_rate_hz: int, channels: int, encoding: str, config: AudioConfig
) -> list[tuple[str, str]]:
    """Return why a recording with these facts is not usable under `config`, if it is not.

    Returns:
        (check name, reason) pairs, empty when the recording is usable. Each reason
        completes a sentence that starts with the file's name, such as "is 44100 Hz, ...".
    """
    problems = []
    if encoding not in config.encodings:
        problems.append((
            "audio_encoding",
            f"is {encoding}, and data.audio.encodings accepts only {', '.join(config.encodings)} "
            f"(add {encoding!r} there to convert it, or re-encode the file)",
        ))
    if sample_rate_hz != config.sample_rate_hz and not config.resample:
        problems.append((
            "audio_sample_rate",
            f"is {sample_rate_hz} Hz, expected {config.sample_rate_hz} Hz "
            "(set data.audio.resample: true to convert it, or resample the file)",
        ))
    if channels != 1 and not config.downmix:
        problems.append((
            "audio_channels",
            f"has {channels} channels, expected 1 "
            "(set data.audio.downmix: true to average them, or convert the file to mono)",
        ))
    return problems


def resample(
    samples: np.ndarray, source_hz: int, target_hz: int, *, zero_crossings: int = 16, rolloff: float = 0.95
) -> np.ndarray:
    """Resample a 1-D signal with a Kaiser-windowed sinc low-pass filter.

    Output sample j is taken at input time j * source_hz / target_hz exactly, as the sum
    of the nearby input samples weighted by the filter. The filter cuts at `rolloff` times
    the lower of the two Nyquist frequencies, so nothing above the target's folds back.
    Samples beyond either end count as zero, so the first and last `zero_crossings`
    periods of the cut-off frequency are attenuated.

    Args:
        samples: The signal.
        source_hz: Its sample rate.
        target_hz: The rate wanted.
        zero_crossings: Half the filter length, in zero crossings of the sinc.
        rolloff: Cut-off as a fraction of the lower Nyquist frequency.

    Returns:
        ceil(len(samples) * target_hz / source_hz) samples, float32.
    """
    if source_hz == target_hz or samples.size == 0:
        return samples.astype(np.float32)
    common = math.gcd(source_hz, target_hz)
    up, down = target_hz // common, source_hz // common
    # Cut-off in cycles per input sample, and the filter's half length in input samples.
    cutoff = 0.5 * min(1.0, up / down) * rolloff
    half = math.ceil(zero_crossings / (2 * cutoff))
    offsets = np.arange(-half + 1, half + 1)
    # Output j lies at input position (j * down) / up: its phase, (j * down) % up, takes
    # only `up` values, so the filter weights are computed once per phase.
    phases = np.arange(up)[:, None] / up
    distance = phases - offsets[None, :]
    inside = np.clip(1.0 - (distance / half) ** 2, 0.0, None)
    window = np.i0(_KAISER_BETA * np.sqrt(inside)) / np.i0(_KAISER_BETA)
    table = 2 * cutoff * np.sinc(2 * cutoff * distance) * window

    n_out = -(-samples.size * up // down)
    padded = np.concatenate([np.zeros(half), samples.astype(np.float64), np.zeros(half + 1)])
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, 4096):
        j = np.arange(start, min(start + 4096, n_out))
        base, phase = np.divmod(j * down, up)
        window_rows = padded[(base + half)[:, None] + offsets[None, :]]
        out[j] = np.einsum("ij,ij->i", window_rows, table[phase])
    return out
