"""Per-row probes of manifest files, on images, WAVs and text written by each test."""

from __future__ import annotations

import csv
import hashlib
import math
import struct
import wave
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmkd.manifest import read_manifest
from mmkd.validation.probes import (
    MAX_IMAGE_PIXELS,
    PROBE_COLUMNS,
    probe_manifest,
    probe_row,
    write_probe_table,
)

ALL_MODALITIES = ("image", "audio", "text")


def probe(root: Path, **cells: Any) -> dict[str, Any]:
    row = {"id": "r1", "label": "3", "split": "train", **cells}
    return probe_row(row, root=root, row_number=7, modalities=ALL_MODALITIES)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def noise_image(mode: str = "L", size: int = 64) -> Image.Image:
    """A random image, so that PNG and JPEG compress it badly and truncation cuts pixel data."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).convert(mode)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A greyscale PNG whose IHDR declares `width` x `height` but whose IDAT contains one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def write_pcm_wav(path: Path, frames: bytes, *, rate: int, channels: int, width: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(frames)


def float_wav_bytes(samples: list[float], *, rate: int, channels: int = 1) -> bytes:
    """An IEEE float (format tag 3) 32-bit WAV built chunk by chunk."""
    data = struct.pack(f"<{len(samples)}f", *samples)
    block_align = 4 * channels
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * block_align, block_align, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


# Records and row fields


def test_record_has_exactly_probe_columns(root: Path) -> None:
    record = probe(root, text="a b")
    assert tuple(record) == PROBE_COLUMNS


def test_row_fields_are_copied(root: Path) -> None:
    record = probe(root, text="a b")
    assert record["row_number"] == 7
    assert record["id"] == "r1"
    assert record["label"] == "3"
    assert record["split"] == "train"


def test_row_without_image_has_no_image_facts(root: Path) -> None:
    record = probe(root, image=None, text="seven")
    assert record["has_image"] is False
    assert record["has_audio"] is False
    assert record["has_text"] is True
    for column in PROBE_COLUMNS:
        if column.startswith(("image_", "audio_")):
            assert record[column] is None, column


def test_modality_not_requested_is_not_probed(root: Path) -> None:
    Image.new("L", (2, 2)).save(root / "a.png")
    record = probe_row({"id": "r", "image": "a.png"}, root=root, row_number=1, modalities=("audio",))
    assert record["has_image"] is False
    assert record["image_path"] is None


# Images


def test_grey_png_reports_size_mode_and_hash(root: Path) -> None:
    image = Image.new("L", (5, 3))
    image.putpixel((1, 2), 200)
    image.save(root / "grey.png")
    record = probe(root, image="grey.png")
    assert record["has_image"] is True
    assert record["image_path"] == "grey.png"
    assert record["image_exists"] is True
    assert record["image_inside_root"] is True
    assert record["image_bytes"] == (root / "grey.png").stat().st_size
    assert record["image_decodes"] is True
    assert record["image_error"] is None
    assert record["image_sha256"] == sha256_of(root / "grey.png")
    assert record["image_width"] == 5
    assert record["image_height"] == 3
    assert record["image_mode"] == "L"
    assert record["image_channels"] == 1
    assert record["image_format"] == "PNG"


def test_missing_image_is_not_found(root: Path) -> None:
    record = probe(root, image="absent.png")
    assert record["image_exists"] is False
    assert record["image_inside_root"] is True
    assert record["image_decodes"] is False
    assert record["image_error"] == "file not found"
    assert record["image_sha256"] is None
    assert record["image_bytes"] is None


def test_empty_image_file_is_reported(root: Path) -> None:
    (root / "empty.png").write_bytes(b"")
    record = probe(root, image="empty.png")
    assert record["image_exists"] is True
    assert record["image_bytes"] == 0
    assert record["image_decodes"] is False
    assert record["image_error"] == "the file is empty"
    assert record["image_sha256"] == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("extension, image_format", [("png", "PNG"), ("jpg", "JPEG")])
def test_truncated_image_does_not_decode(root: Path, extension: str, image_format: str) -> None:
    whole = root / f"whole.{extension}"
    noise_image().save(whole)
    content = whole.read_bytes()
    (root / f"cut.{extension}").write_bytes(content[: len(content) // 2])
    record = probe(root, image=f"cut.{extension}")
    assert record["image_decodes"] is False
    assert record["image_error"].startswith("image data does not decode: image file is truncated")
    # The header survives the cut, so its facts are still reported.
    assert record["image_width"] == 64
    assert record["image_format"] == image_format


def test_text_file_named_png_is_not_an_image(root: Path) -> None:
    (root / "notes.png").write_text("this is not a picture\n", encoding="utf-8")
    record = probe(root, image="notes.png")
    assert record["image_exists"] is True
    assert record["image_decodes"] is False
    assert record["image_error"] == "not an image in a format PIL recognises"
    assert record["image_sha256"] == sha256_of(root / "notes.png")
    assert record["image_width"] is None


@pytest.mark.parametrize(
    "mode, file_name, channels",
    [("CMYK", "cmyk.jpg", 4), ("I;16", "deep.png", 1), ("P", "palette.png", 1), ("RGBA", "alpha.png", 4)],
)
def test_uncommon_image_modes_decode(root: Path, mode: str, file_name: str, channels: int) -> None:
    Image.new(mode, (6, 4)).save(root / file_name)
    record = probe(root, image=file_name)
    assert record["image_decodes"] is True
    assert record["image_error"] is None
    assert record["image_mode"] == mode
    assert record["image_channels"] == channels
    assert (record["image_width"], record["image_height"]) == (6, 4)


def test_huge_image_is_not_decoded(root: Path) -> None:
    # 20000 x 20000 is above twice PIL's default limit, so Image.open itself rejects it.
    (root / "bomb.png").write_bytes(png_header_only(20000, 20000))
    record = probe(root, image="bomb.png")
    assert record["image_decodes"] is False
    assert record["image_error"] == (
        f"image declares 400000000 pixels, above the limit of {MAX_IMAGE_PIXELS}; not decoded"
    )


def test_image_over_limit_is_not_decoded(root: Path) -> None:
    # 9000 x 9000 = 81,000,000 lies between MAX_IMAGE_PIXELS and PIL's own default limit.
    (root / "large.png").write_bytes(png_header_only(9000, 9000))
    record = probe(root, image="large.png")
    assert record["image_decodes"] is False
    assert record["image_error"] == (
        f"image declares 9000x9000 = 81000000 pixels, above the limit of {MAX_IMAGE_PIXELS}; not decoded"
    )
    assert record["image_width"] == 9000
    assert record["image_height"] == 9000


def test_unicode_file_name_decodes(root: Path) -> None:
    name = "ñandú_数字.png"
    Image.new("RGB", (3, 2)).save(root / name)
    record = probe(root, image=name)
    assert record["image_inside_root"] is True
    assert record["image_decodes"] is True
    assert record["image_channels"] == 3


# Paths outside the data root


def test_parent_path_is_not_read(root: Path) -> None:
    Image.new("L", (2, 2)).save(root.parent / "outside.png")
    record = probe(root, image="../outside.png")
    assert record["image_inside_root"] is False
    assert record["image_error"] == "path escapes the data root"
    assert record["image_exists"] is None
    assert record["image_sha256"] is None
    assert record["image_width"] is None


def test_absolute_path_is_not_read(root: Path) -> None:
    outside = root.parent / "outside.png"
    Image.new("L", (2, 2)).save(outside)
    record = probe(root, image=str(outside))
    assert record["image_inside_root"] is False
    assert record["image_error"] == "path escapes the data root"
    assert record["image_sha256"] is None


def test_symlink_out_of_root_is_not_read(root: Path) -> None:
    outside = root.parent / "outside.wav"
    write_pcm_wav(outside, b"\x01\x00" * 10, rate=8000, channels=1, width=2)
    (root / "link.wav").symlink_to(outside)
    record = probe(root, audio="link.wav")
    assert record["audio_inside_root"] is False
    assert record["audio_error"] == "path escapes the data root"
    assert record["audio_sha256"] is None
    assert record["audio_sample_rate_hz"] is None


def test_symlink_within_root_is_followed(root: Path) -> None:
    Image.new("L", (2, 2)).save(root / "target.png")
    (root / "link.png").symlink_to(root / "target.png")
    record = probe(root, image="link.png")
    assert record["image_inside_root"] is True
    assert record["image_decodes"] is True


def test_directory_is_not_a_regular_file(root: Path) -> None:
    (root / "folder.png").mkdir()
    record = probe(root, image="folder.png")
    assert record["image_exists"] is True
    assert record["image_decodes"] is False
    assert record["image_error"] == "not a regular file"
    assert record["image_sha256"] is None


def test_symlink_loop_is_reported(root: Path) -> None:
    (root / "a.png").symlink_to(root / "b.png")
    (root / "b.png").symlink_to(root / "a.png")
    record = probe(root, image="a.png")
    assert record["image_decodes"] is False
    assert record["image_error"].startswith("cannot resolve the path")


# Audio


def test_mono_16_bit_wav_facts(root: Path) -> None:
    samples = [round(12000 * math.sin(2 * math.pi * 440 * n / 8000)) for n in range(4000)]
    write_pcm_wav(root / "tone.wav", struct.pack(f"<{len(samples)}h", *samples), rate=8000, channels=1, width=2)
    record = probe(root, audio="tone.wav")
    assert record["audio_decodes"] is True
    assert record["audio_error"] is None
    assert record["audio_sha256"] == sha256_of(root / "tone.wav")
    assert record["audio_sample_rate_hz"] == 8000
    assert record["audio_channels"] == 1
    assert record["audio_bit_depth"] == 16
    assert record["audio_encoding"] == "pcm16"
    assert record["audio_duration_s"] == pytest.approx(0.5)
    assert record["audio_peak"] == pytest.approx(max(abs(s) for s in samples) / 32768)
    assert record["audio_silent"] is False
    assert record["audio_nonfinite"] == 0


def test_stereo_wav_duration_counts_frames(root: Path) -> None:
    left = [1000] * 4410
    right = [-20000] * 4410
    interleaved = [value for pair in zip(left, right) for value in pair]
    write_pcm_wav(root / "stereo.wav", struct.pack(f"<{len(interleaved)}h", *interleaved), rate=44100, channels=2, width=2)
    record = probe(root, audio="stereo.wav")
    assert record["audio_channels"] == 2
    assert record["audio_sample_rate_hz"] == 44100
    assert record["audio_duration_s"] == pytest.approx(0.1)
    assert record["audio_peak"] == pytest.approx(20000 / 32768)


def test_24_bit_wav_peak_is_scaled(root: Path) -> None:
    samples = [0, 1 << 22, -6291456, 100]
    frames = b"".join(value.to_bytes(3, "little", signed=True) for value in samples)
    write_pcm_wav(root / "deep.wav", frames, rate=16000, channels=1, width=3)
    record = probe(root, audio="deep.wav")
    assert record["audio_decodes"] is True
    assert record["audio_bit_depth"] == 24
    assert record["audio_peak"] == pytest.approx(0.75)
    assert record["audio_duration_s"] == pytest.approx(4 / 16000)


def test_float32_wav_is_read_by_hand(root: Path) -> None:
    (root / "float.wav").write_bytes(float_wav_bytes([0.0, 0.5, -0.25, 0.125], rate=16000))
    record = probe(root, audio="float.wav")
    assert record["audio_decodes"] is True
    assert record["audio_error"] is None
    assert record["audio_encoding"] == "float32"
    assert record["audio_bit_depth"] == 32
    assert record["audio_sample_rate_hz"] == 16000
    assert record["audio_duration_s"] == pytest.approx(4 / 16000)
    assert record["audio_peak"] == pytest.approx(0.5)
    assert record["audio_nonfinite"] == 0


def test_float_wav_counts_nan_and_inf_samples(root: Path) -> None:
    samples = [0.1, math.nan, -0.3, math.inf, math.nan, -math.inf, 0.2]
    (root / "nan.wav").write_bytes(float_wav_bytes(samples, rate=8000))
    record = probe(root, audio="nan.wav")
    assert record["audio_decodes"] is True
    assert record["audio_nonfinite"] == 4
    # The peak is taken over finite samples only.
    assert record["audio_peak"] == pytest.approx(0.3)


def test_all_zero_wav_is_silent(root: Path) -> None:
    write_pcm_wav(root / "quiet.wav", b"\x00\x00" * 800, rate=8000, channels=1, width=2)
    record = probe(root, audio="quiet.wav")
    assert record["audio_decodes"] is True
    assert record["audio_peak"] == 0.0
    assert record["audio_silent"] is True


def test_truncated_wav_does_not_decode(root: Path) -> None:
    write_pcm_wav(root / "whole.wav", b"\x10\x00" * 4000, rate=8000, channels=1, width=2)
    content = (root / "whole.wav").read_bytes()
    # The wave module writes a 44-byte header, so 4000 of the 8000 data bytes remain.
    (root / "cut.wav").write_bytes(content[: 44 + 4000])
    record = probe(root, audio="cut.wav")
    assert record["audio_decodes"] is False
    assert record["audio_error"] == "truncated WAV: the data chunk declares 8000 bytes but the file contains only 4000"
    assert record["audio_sample_rate_hz"] == 8000
    assert record["audio_duration_s"] == pytest.approx(0.5)
    assert record["audio_peak"] is None


def test_rifx_header_is_corrupt(root: Path) -> None:
    write_pcm_wav(root / "whole.wav", b"\x10\x00" * 100, rate=8000, channels=1, width=2)
    (root / "rifx.wav").write_bytes(b"RIFX" + (root / "whole.wav").read_bytes()[4:])
    record = probe(root, audio="rifx.wav")
    assert record["audio_decodes"] is False
    assert record["audio_error"].startswith("corrupt WAV header: expected 'RIFF....WAVE', found b'RIFX")
    assert record["audio_sha256"] == sha256_of(root / "rifx.wav")


def test_garbage_wav_is_corrupt(root: Path) -> None:
    (root / "noise.wav").write_bytes(bytes(range(256)) * 4)
    record = probe(root, audio="noise.wav")
    assert record["audio_decodes"] is False
    assert record["audio_error"].startswith("corrupt WAV header")


def test_wav_without_data_chunk_is_corrupt(root: Path) -> None:
    content = float_wav_bytes([0.5], rate=8000)
    (root / "nodata.wav").write_bytes(content[: content.index(b"data")])
    record = probe(root, audio="nodata.wav")
    assert record["audio_decodes"] is False
    assert record["audio_error"] == "corrupt WAV header: no 'data' chunk"


# Text


def test_text_counts_chars_and_tokens(root: Path) -> None:
    record = probe(root, text="seven  eight\tnine\n")
    assert record["has_text"] is True
    assert record["text_chars"] == 18
    assert record["text_tokens"] == 3
    assert record["text_blank"] is False
    assert record["text_sha256"] == hashlib.sha256(b"seven  eight\tnine\n").hexdigest()


@pytest.mark.parametrize("text", ["", " \t\n "])
def test_empty_or_whitespace_text_is_blank(root: Path, text: str) -> None:
    record = probe(root, text=text)
    assert record["has_text"] is True
    assert record["text_blank"] is True
    assert record["text_tokens"] == 0
    assert record["text_chars"] == len(text)


# Whole manifests


def write_manifest_csv(root: Path, rows: int) -> Path:
    Image.new("L", (4, 4), 9).save(root / "digit.png")
    path = root / "manifest.csv"
    with open(path, "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "label", "split", "image", "text"])
        for i in range(rows):
            image = "missing.png" if i == 10 else "digit.png"
            writer.writerow([f"row-{i}", str(i % 10), "train", image, f"number {i}"])
    return path


def test_probe_manifest_yields_rows_in_order(root: Path) -> None:
    manifest = read_manifest(write_manifest_csv(root, 600))
    records = list(probe_manifest(manifest, workers=2, chunk_rows=64))
    assert [record["row_number"] for record in records] == list(range(1, 601))
    assert [record["id"] for record in records] == [f"row-{i}" for i in range(600)]
    assert records[10]["image_error"] == "file not found"
    assert sum(record["image_decodes"] for record in records) == 599
    assert records[599]["text_tokens"] == 2


def test_probe_manifest_rejects_zero_workers(root: Path) -> None:
    manifest = read_manifest(write_manifest_csv(root, 3))
    with pytest.raises(ValueError, match="workers and chunk_rows must be at least 1, got 0 and 256"):
        list(probe_manifest(manifest, workers=0))


def test_write_probe_table_writes_header_and_rows(root: Path, tmp_path: Path) -> None:
    manifest = read_manifest(write_manifest_csv(root, 600))
    table = tmp_path / "out" / "probes.csv"
    count = write_probe_table(probe_manifest(manifest), table)
    assert count == 600
    with open(table, encoding="utf-8", newline="") as stream:
        rows = list(csv.reader(stream))
    assert tuple(rows[0]) == PROBE_COLUMNS
    assert len(rows) == 601
    first = dict(zip(rows[0], rows[1]))
    assert first["id"] == "row-0"
    assert first["image_decodes"] == "True"
    assert first["audio_path"] == ""
    assert sorted(path.name for path in table.parent.iterdir()) == ["probes.csv"]

