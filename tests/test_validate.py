"""The validate stage on a small manifest with broken rows, under both policies."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mmkd.config import AudioConfig, config_from_dict
from mmkd.errors import ConfigError
from mmkd.data.loading import load_dataset
from mmkd.validation.validate import validate_manifest

from test_rows import broken_manifest  # noqa: F401  (fixture)
from test_wav import pcm24_bytes, write_wav


def config_for(manifest, tmp_path, **validation):
    return config_from_dict(
        # The six rows are too few for the per-split counts, which other tests cover.
        {"data": {"manifest": str(manifest), "classes": [str(d) for d in range(10)], "split_fractions": {"train": 1.0}},
         "validation": {"min_rows_per_class": 0, "min_rows_per_class_per_split": 0, **validation}},
        base_dir=tmp_path,
    )


def test_stop_policy_fails_naming_every_broken_row(broken_manifest, tmp_path):
    result = validate_manifest(config_for(broken_manifest, tmp_path), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert result.passed is False
    assert report["passed"] is False
    assert sorted({p["row_id"] for p in report["problems"]}) == ["c", "d", "e", "f"]
    assert result.clean_manifest is None
    assert (tmp_path / "out" / "gx").is_dir()
    assert str(tmp_path / "out") in report["data_docs_index"]


def test_quarantine_sets_aside_exactly_the_broken_rows_and_counts_reconcile(broken_manifest, tmp_path):
    config = config_for(broken_manifest, tmp_path, on_failure="quarantine", max_quarantined_fraction=0.7)
    result = validate_manifest(config, tmp_path / "out")
    assert result.passed is True
    assert (result.rows_in, result.rows_kept, result.rows_quarantined) == (6, 2, 4)
    assert result.rows_in == result.rows_kept + result.rows_quarantined

    with open(tmp_path / "out" / "quarantine.csv", newline="", encoding="utf-8") as handle:
        quarantined = {row["id"]: row for row in csv.DictReader(handle)}
    assert sorted(quarantined) == ["c", "d", "e", "f"]
    assert quarantined["d"]["reasons"] == (
        "row 'd': audio 'fast.wav' is 16000 Hz, expected 8000 Hz (set data.audio.resample: true to convert it, or resample the file)"
    )
    assert quarantined["d"]["values"] == "fast.wav"
    assert quarantined["e"]["checks"] == "image_leakage"

    # The clean manifest keeps the rest, and the loader reads it against the original folder.
    clean = pd.read_csv(result.clean_manifest, dtype=str)
    assert clean["id"].tolist() == ["a", "b"]
    data = config.data.model_copy(update={"manifest": result.clean_manifest, "root": broken_manifest.parent})
    assert load_dataset(data).ids == ["a", "b"]


def test_quarantine_over_the_allowed_fraction_fails(broken_manifest, tmp_path):
    result = validate_manifest(config_for(broken_manifest, tmp_path, on_failure="quarantine"), tmp_path / "out")
    assert result.passed is False
    assert "4 of 6 rows set aside (66.7%, limit 5.0%)" in result.message


def converted_recordings(folder):
    """Four recordings that need a conversion: stereo, 44.1 kHz, 24-bit and float, with one image each."""
    folder.mkdir()
    frames = np.round(8000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int64)
    recordings = {
        "stereo.wav": (np.repeat(frames, 2).astype("<i2").tobytes(), 1, 8000, 2, 16),
        "fast.wav": (np.round(8000 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100)).astype("<i2").tobytes(), 1, 44100, 1, 16),
        "deep.wav": (pcm24_bytes(frames * 256), 1, 8000, 1, 24),
        "float.wav": ((frames / 32768).astype("<f4").tobytes(), 3, 8000, 1, 32),
    }
    rows = []
    for index, (name, (data, tag, rate, channels, bits)) in enumerate(recordings.items()):
        write_wav(folder / name, data, tag=tag, rate=rate, channels=channels, bits=bits)
        Image.fromarray(np.full((28, 28), 20 * index, dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append((f"r{index}", str(index), "train", f"{index}.png", name))
    path = folder / "manifest.csv"
    pd.DataFrame(rows, columns=["id", "label", "split", "image", "audio"]).to_csv(path, index=False)
    return path


def test_conversions_are_rejected_unless_the_config_allows_them(tmp_path):
    manifest = converted_recordings(tmp_path / "data")
    result = validate_manifest(config_for(manifest, tmp_path), tmp_path / "strict")
    report = json.loads(result.report.read_text())
    assert result.passed is False
    assert {(p["row_id"], p["check"]) for p in report["problems"]} == {
        ("r0", "audio_channels"), ("r1", "audio_sample_rate"), ("r2", "audio_encoding"), ("r3", "audio_encoding"),
    }

    allowed = config_for(manifest, tmp_path)
    allowed.data.audio = AudioConfig(encodings=["pcm16", "pcm24", "float32"], resample=True, downmix=True)
    result = validate_manifest(allowed, tmp_path / "allowed")
    assert result.passed is True
    assert result.rows_kept == 4
    # The loader converts the same rows: every recording is the 440 Hz tone at 8 kHz.
    dataset = load_dataset(allowed.data)
    expected = 8000 / 32768 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    for row in range(4):
        assert np.abs(dataset.inputs["audio"][row, 800:7200].numpy() - expected[800:7200]).max() < 1e-3


def test_label_rule_missing_column_is_config_error(broken_manifest, tmp_path):
    config = config_for(broken_manifest, tmp_path, label_rules=[{"column": "speaker", "pattern": r"(\d)"}])
    with pytest.raises(ConfigError, match=r"validation.label_rules\[0\].column: 'speaker' is not a column of the manifest"):
        validate_manifest(config, tmp_path / "out")


def test_label_rule_invalid_pattern_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid regular expression '\(\\\\d'"):
        config_for(tmp_path / "m.csv", tmp_path, label_rules=[{"column": "audio", "pattern": r"(\d"}])


def test_cli_validate_exits_0_1_and_2(broken_manifest, tmp_path, capsys):
    from mmkd.cli import main

    clean = pd.read_csv(broken_manifest, dtype=str).iloc[:2]
    clean.to_csv(tmp_path / "clean.csv", index=False)
    configs = {}
    for name, manifest in (("clean", tmp_path / "clean.csv"), ("broken", broken_manifest)):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({
            "data": {"manifest": str(manifest), "classes": [str(d) for d in range(10)], "split_fractions": {"train": 1.0}},
            "validation": {"min_rows_per_class": 0, "min_rows_per_class_per_split": 0},
        }), encoding="utf-8")
    assert main(["validate", str(configs["clean"]), "--out", str(tmp_path / "a")]) == 0
    assert main(["validate", str(configs["broken"]), "--out", str(tmp_path / "b")]) == 1
    assert "FAILED: 4 of 6 rows have critical problems" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "c")]) == 2
