"""The real audio-visual digits manifest with rows broken in every way that validation checks.

The 2,500-row manifest is built from the real FSDD and MNIST files, given a text column
and an extra column, and written with a byte-order mark and CRLF line ends. Then single
rows are broken, one way each, and the test states which checks each row must fail.
Rows whose files are unusual but usable (CMYK, 16-bit, palette and RGBA images, silence,
a unicode file name) must be kept.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mmkd.config import load_config
from mmkd.validation.validate import validate_manifest

from conftest import FSDD_DIR, MNIST_CSV, TINY_CONFIG, require_shared_data
from test_probes import png_header_only
from test_wav import pcm24_bytes, write_wav

LATIN1_MARKER = "@@latin-1@@"
PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "src" / "mmkd" / "configs" / "avdigits.yaml"


@dataclass
class BrokenData:
    manifest: Path
    rows: int
    # 1-based row number -> the checks that row must fail.
    expected: dict[int, set[str]] = field(default_factory=dict)
    # Row numbers of unusual rows that must be kept.
    kept: dict[str, int] = field(default_factory=dict)


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` as a new file in place of `path`."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def wav_bytes(samples: np.ndarray, *, rate: int = 8000, channels: int = 1) -> bytes:
    stream = io.BytesIO()
    with wave.open(stream, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return stream.getvalue()


def image_bytes(image: Image.Image, image_format: str) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format=image_format)
    return stream.getvalue()


def tone(rate: int, frames: int) -> np.ndarray:
    return np.round(8000 * np.sin(2 * np.pi * 440 * np.arange(frames) / rate))


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> BrokenData:
    require_shared_data()
    from mmkd.data.avdigits import build_avdigits

    root = tmp_path_factory.mktemp("broken-avdigits")
    built = build_avdigits(root / "data", fsdd_dir=FSDD_DIR, mnist=MNIST_CSV)
    data = built.parent
    frame = pd.read_csv(built, dtype=str, keep_default_na=False)
    frame["text"] = "the digit " + frame["label"]
    frame["notes"] = "kept as is"
    outside = root / "outside"
    outside.mkdir()
    result = BrokenData(manifest=data / "manifest.csv", rows=len(frame))

    # Distinct rows for each break, taken in turn from each split.
    by_split = {split: list(frame.index[frame["split"] == split]) for split in ("train", "val", "test")}
    order = [i for group in zip(*by_split.values()) for i in group]
    picks = iter(order[5:])
    used: set[int] = set()

    def row(checks: set[str]) -> int:
        index = next(picks)
        used.add(index)
        if checks:
            result.expected[index + 1] = checks
        return index

    def file_of(index: int, column: str) -> Path:
        return data / frame.at[index, column]

    # Images.
    file_of(row({"image_decodes"}), "image").unlink()
    replace_file(file_of(row({"image_decodes"}), "image"), b"")
    i = row({"image_decodes"})
    replace_file(file_of(i, "image"), file_of(i, "image").read_bytes()[:150])
    i = row({"image_decodes"})
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    frame.at[i, "image"] = frame.at[i, "image"].replace(".png", ".jpg")
    replace_file(file_of(i, "image"), image_bytes(noise, "JPEG")[:400])
    replace_file(file_of(row({"image_decodes"}), "image"), b"this is text, not a PNG\n")
    replace_file(file_of(row({"image_decodes"}), "image"), png_header_only(20000, 20000))
    for mode, image_format, suffix in (("CMYK", "JPEG", ".jpg"), ("I;16", "PNG", ".png"), ("P", "PNG", ".png"), ("RGBA", "PNG", ".png")):
        i = row(set())
        result.kept[mode] = i + 1
        grey = Image.open(file_of(i, "image")).convert("L")
        image = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257) if mode == "I;16" else grey.convert(mode)
        frame.at[i, "image"] = frame.at[i, "image"].replace(".png", suffix)
        replace_file(file_of(i, "image"), image_bytes(image, image_format))

    # Recordings.
    file_of(row({"audio_decodes"}), "audio").unlink()
    i = row({"audio_decodes"})
    replace_file(file_of(i, "audio"), file_of(i, "audio").read_bytes()[:300])
    i = row({"audio_decodes"})
    replace_file(file_of(i, "audio"), b"RIFX" + file_of(i, "audio").read_bytes()[4:])
    replace_file(file_of(row({"audio_channels"}), "audio"), wav_bytes(np.repeat(tone(8000, 8000), 2), channels=2))
    replace_file(file_of(row({"audio_sample_rate"}), "audio"), wav_bytes(tone(44100, 44100), rate=44100))
    write_wav(file_of(row({"audio_encoding"}), "audio"), pcm24_bytes(tone(8000, 8000) * 256), tag=1, rate=8000, channels=1, bits=24)
    floats = (tone(8000, 8000) / 32768).astype("<f4")
    path = file_of(row({"audio_encoding"}), "audio")
    path.unlink()
    write_wav(path, floats.tobytes(), tag=3, rate=8000, channels=1, bits=32)
    floats[100] = np.nan
    path = file_of(row({"audio_encoding", "audio_finite"}), "audio")
    path.unlink()
    write_wav(path, floats.tobytes(), tag=3, rate=8000, channels=1, bits=32)
    i = row(set())
    result.kept["silent"] = i + 1
    replace_file(file_of(i, "audio"), wav_bytes(np.zeros(8000)))

    # Text.
    frame.at[row({"text_not_blank"}), "text"] = "   "
    frame.at[row({"text_utf8"}), "text"] = LATIN1_MARKER
    frame.at[row({"text_max_chars"}), "text"] = "seven " * 2000

    # Labels and ids.
    i = row({"label_in_classes", "label_from_audio", "label_from_image"})
    frame.at[i, "label"] = "11"
    frame.at[row({"label_present"}), "label"] = ""
    first, second = row({"id_unique"}), row({"id_unique"})
    frame.at[second, "id"] = frame.at[first, "id"]
    a, b = row({"label_from_audio"}), row({"label_from_audio"})
    while frame.at[b, "label"] == frame.at[a, "label"]:
        del result.expected[b + 1]
        b = row({"label_from_audio"})
    frame.at[a, "audio"], frame.at[b, "audio"] = frame.at[b, "audio"], frame.at[a, "audio"]

    # Leakage: a test row's image becomes a copy of a training row's image.
    source = by_split["train"][0]
    target = next(i for i in by_split["test"] if i not in used)
    used.add(target)
    result.expected[target + 1] = {"image_leakage"}
    replace_file(file_of(target, "image"), file_of(source, "image").read_bytes())

    # Paths that leave the data root.
    i = row({"image_inside_root"})
    escaped = outside / Path(frame.at[i, "image"]).name
    shutil.copy(file_of(i, "image"), escaped)
    frame.at[i, "image"] = f"../outside/{escaped.name}"
    i = row({"image_inside_root"})
    frame.at[i, "image"] = str(file_of(i, "image").resolve())
    i = row({"image_inside_root"})
    file_of(i, "image").unlink()
    file_of(i, "image").symlink_to(escaped)

    # A unicode file name is fine.
    i = row(set())
    result.kept["unicode"] = i + 1
    new_name = frame.at[i, "image"].replace(".png", "_ünïcödé.png")
    file_of(i, "image").rename(data / new_name)
    frame.at[i, "image"] = new_name

    # Byte-order mark, CRLF line ends, and one cell of latin-1 bytes.
    text = io.StringIO()
    frame.to_csv(text, index=False, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    body = ("\ufeff" + text.getvalue()).encode("utf-8").replace(LATIN1_MARKER.encode(), "café".encode("latin-1"))
    result.manifest.write_bytes(body)
    return result


def config_file(folder: Path, broken: BrokenData, **validation) -> Path:
    """The packaged avdigits config, with the tiny models and the broken manifest."""
    config = yaml.safe_load(PACKAGED_CONFIG.read_text(encoding="utf-8"))
    config.update({key: TINY_CONFIG[key] for key in ("teacher", "student", "distill", "finetune", "benchmark")})
    config["data"]["manifest"] = str(broken.manifest)
    config["validation"].update(validation)
    config["device"] = "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def checks_by_row(report: dict) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for problem in report["problems"]:
        found.setdefault(problem["row_number"], set()).add(problem["check"])
    return found


def test_broken_rows_each_fail_their_checks(broken, tmp_path):
    result = validate_manifest(load_config(config_file(tmp_path, broken)), tmp_path / "out")
    report = json.loads(result.report.read_text(encoding="utf-8"))
    assert result.passed is False
    assert checks_by_row(report) == broken.expected
    # Every kind of break is among them.
    assert set().union(*broken.expected.values()) == {
        "image_decodes", "image_inside_root", "image_leakage",
        "audio_decodes", "audio_channels", "audio_sample_rate", "audio_encoding", "audio_finite",
        "text_not_blank", "text_utf8", "text_max_chars",
        "label_in_classes", "label_present", "id_unique", "label_from_audio", "label_from_image",
    }


def test_unusual_but_usable_rows_are_kept_with_warnings(broken, tmp_path):
    result = validate_manifest(load_config(config_file(tmp_path, broken)), tmp_path / "out")
    report = json.loads(result.report.read_text(encoding="utf-8"))
    checks = {check["name"]: check for check in report["checks"]}
    flagged = {row["row_number"] for row in checks["image_mode"]["failing_rows"]}
    assert flagged == {broken.kept["CMYK"], broken.kept["I;16"], broken.kept["P"], broken.kept["RGBA"]}
    assert {row["row_number"] for row in checks["audio_not_silent"]["failing_rows"]} == {broken.kept["silent"]}
    assert set(broken.kept.values()).isdisjoint(checks_by_row(report))


def test_quarantine_sets_aside_exactly_the_broken_rows(broken, tmp_path):
    config = load_config(config_file(tmp_path, broken, on_failure="quarantine"))
    result = validate_manifest(config, tmp_path / "out")
    assert result.passed is True
    assert result.rows_quarantined == len(broken.expected)
    assert result.rows_in == result.rows_kept + result.rows_quarantined == broken.rows

    with open(tmp_path / "out" / "quarantine.csv", newline="", encoding="utf-8") as handle:
        quarantined = {int(row["row_number"]): row for row in csv.DictReader(handle)}
    assert set(quarantined) == set(broken.expected)
    for number, checks in broken.expected.items():
        assert set(quarantined[number]["checks"].split(" | ")) == checks

    clean = pd.read_csv(result.clean_manifest, dtype=str, keep_default_na=False)
    assert len(clean) == result.rows_kept
    assert (clean["notes"] == "kept as is").all()


def test_pipeline_stop_names_every_broken_row(broken, tmp_path, prefect_server):
    from mmkd.errors import DataError
    from mmkd.flows.pipeline import pipeline_flow

    with pytest.raises(DataError, match="Validation failed") as info:
        pipeline_flow(str(config_file(tmp_path, broken)), str(tmp_path / "runs"))
    message = str(info.value)
    for number in broken.expected:
        assert f" {number} (" in message


def test_pipeline_quarantine_trains_on_the_rest(broken, tmp_path, prefect_server):
    from mmkd.flows.pipeline import pipeline_flow

    result = pipeline_flow(str(config_file(tmp_path, broken, on_failure="quarantine")), str(tmp_path / "runs"))
    validation = result["validation"]
    assert validation["rows_quarantined"] == len(broken.expected)
    assert result["features"]["rows"] == broken.rows - len(broken.expected)
    # Two epochs of the tiny teacher on the rows kept are well above the 10% of chance.
    assert result["teacher"]["test"]["accuracy"] > 0.3
