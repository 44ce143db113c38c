import math
import shutil
import wave

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmkd.config import DataConfig, LabelRule
from mmkd.manifest import read_manifest
from mmkd.validation.probes import probe_manifest
from mmkd.validation.rows import add_dataset_columns, implied_labels, row_problems

from conftest import FSDD_DIR, require_shared_data

CLASSES = [str(d) for d in range(10)]
DATA = DataConfig(manifest="manifest.csv")


def write_wav(path, rate, samples):
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.asarray(samples, dtype="<i2").tobytes())


@pytest.fixture
def broken_manifest(tmp_path):
    """Six rows: two clean, then a missing file, a 16 kHz recording, a test copy of a
    training image, and a label outside the classes."""
    require_shared_data()
    for name in ("0_george_0.wav", "1_george_0.wav", "2_george_0.wav", "3_george_0.wav", "4_george_0.wav"):
        shutil.copy(FSDD_DIR / "recordings" / name, tmp_path / name)
    write_wav(tmp_path / "fast.wav", 16000, np.arange(4000) % 200)
    for index in range(5):
        Image.fromarray(np.full((28, 28), 30 * index, dtype=np.uint8), mode="L").save(tmp_path / f"{index}.png")
    shutil.copy(tmp_path / "0.png", tmp_path / "copy-of-0.png")
    rows = [
        ("a", "0", "train", "0.png", "0_george_0.wav"),
        ("b", "1", "train", "1.png", "1_george_0.wav"),
        ("c", "2", "val", "2.png", "missing.wav"),
        ("d", "3", "val", "3.png", "fast.wav"),
        ("e", "4", "test", "copy-of-0.png", "4_george_0.wav"),
        ("f", "11", "train", "4.png", "3_george_0.wav"),
    ]
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["id", "label", "split", "image", "audio"]).to_csv(path, index=False)
    return path


def problems_by_row(manifest_path):
    manifest = read_manifest(manifest_path, modalities=["image", "audio"])
    table = add_dataset_columns(pd.DataFrame(list(probe_manifest(manifest))))
    return {
        record["id"]: row_problems(record, classes=CLASSES, data=DATA)
        for record in table.to_dict("records")
    }


def test_each_broken_row_gets_its_own_reason_and_clean_rows_none(broken_manifest):
    problems = problems_by_row(broken_manifest)
    assert problems["a"] == []
    assert problems["b"] == []
    assert [p.check for p in problems["c"]] == ["audio_decodes"]
    assert [p.check for p in problems["d"]] == ["audio_sample_rate"]
    assert [p.check for p in problems["e"]] == ["image_leakage"]
    assert [p.check for p in problems["f"]] == ["label_in_classes"]


def test_reasons_name_the_row_the_file_and_the_fix(broken_manifest):
    problems = problems_by_row(broken_manifest)
    assert problems["d"][0].message == (
        "row 'd': audio 'fast.wav' is 16000 Hz, expected 8000 Hz (set data.audio.resample: true to convert it, or resample the file)"
    )
    assert problems["d"][0].row_number == 4
    assert problems["d"][0].value == "fast.wav"
    assert problems["c"][0].message.startswith("row 'c': audio 'missing.wav' cannot be used: ")
    assert "'copy-of-0.png' has the same content as a file in another split" in problems["e"][0].message
    assert "label '11' is not one of the declared classes" in problems["f"][0].message


def test_dataset_columns_count_shared_ids_splits_and_labels():
    probes = pd.DataFrame({
        "row_number": [1, 2, 3, 4],
        "id": ["x", "x", "y", "z"],
        "label": ["0", "0", "1", "2"],
        "split": ["train", "test", "train", "train"],
        "has_image": [True, True, True, True],
        "has_audio": [False, False, True, True],
        "has_text": [False, False, False, False],
        "image_sha256": ["h1", "h1", "h2", "h2"],
        "audio_sha256": [None, None, "a", "a"],
        "text_sha256": [None, None, None, None],
    })
    table = add_dataset_columns(probes)
    assert table["id_count"].tolist() == [2, 2, 1, 1]
    assert table["modality_count"].tolist() == [1, 1, 2, 2]
    assert table["image_split_count"].tolist() == [2, 2, 1, 1]
    assert table["audio_split_count"].isna().tolist() == [True, True, False, False]
    assert table["content_label_count"].tolist() == [1, 1, 2, 2]
    # Train has three of four rows and one row of each label; test has label 0 only.
    assert table["split_share"].tolist() == [0.75, 0.25, 0.75, 0.75]
    assert table["class_imbalance"].tolist() == [1.0, math.inf, 1.0, 1.0]
    assert table["image_coverage"].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert table["audio_coverage"].tolist() == pytest.approx([2 / 3, 0.0, 2 / 3, 2 / 3])


def test_class_imbalance_counts_declared_classes():
    probes = pd.DataFrame({
        "row_number": range(1, 6),
        "id": list("abcde"),
        "label": ["0", "0", "0", "1", "2"],
        "split": ["train"] * 5,
        "has_image": [True] * 5,
        "has_audio": [True] * 5,
        "image_sha256": list("vwxyz"),
        "audio_sha256": list("VWXYZ"),
        "text_sha256": [None] * 5,
    })
    assert add_dataset_columns(probes, classes=["0", "1", "2"])["class_imbalance"].iloc[0] == 3.0
    assert add_dataset_columns(probes, classes=["0", "1", "2", "3"])["class_imbalance"].iloc[0] == math.inf


def test_shared_ids_and_conflicting_labels_are_problems_of_every_row_involved():
    probes = pd.DataFrame({
        "row_number": [1, 2, 3, 4],
        "id": ["x", "x", "y", "z"],
        "label": ["0", "0", "1", "2"],
        "split": ["train", "train", "train", "train"],
        "has_image": [True, True, True, True],
        "has_audio": [False] * 4,
        "has_text": [False] * 4,
        "image_path": ["x.png", "x2.png", "y.png", "z.png"],
        "image_inside_root": [True] * 4,
        "image_error": [None] * 4,
        "image_sha256": ["h1", "h3", "h2", "h2"],
        "audio_sha256": [None] * 4,
        "text_sha256": [None] * 4,
    })
    records = add_dataset_columns(probes).to_dict("records")
    checks = [[p.check for p in row_problems(r, classes=CLASSES, data=DATA)] for r in records]
    assert checks == [["id_unique"], ["id_unique"], ["content_one_label"], ["content_one_label"]]


@pytest.mark.parametrize(
    ("pattern", "cell", "label", "matched"),
    [
        (r"(?P<label>\d)_", "audio/7_x.wav", "7", True),
        (r"audio/(\d)", "audio/7_x.wav", "7", True),
        (r"\d", "audio/7_x.wav", "7", True),
        (None, " 7 ", "7", True),
        (r"(?P<label>\d)_", "audio/x.wav", None, False),
        (r"(?P<label>\d)_", None, None, None),
    ],
    ids=["named-group", "first-group", "whole-match", "cell-itself", "no-match", "empty-cell"],
)
def test_implied_labels_read_the_rule(pattern, cell, label, matched):
    implied, found = implied_labels(pd.Series([cell]), LabelRule(column="audio", pattern=pattern))
    assert implied[0] == label
    assert found[0] == matched
