"""The validate stage on a small manifest with broken rows, under both policies."""

import csv
import json

import pandas as pd

from mmkd.config import config_from_dict
from mmkd.data.loading import load_dataset
from mmkd.validation.validate import validate_manifest

from test_rows import broken_manifest  # noqa: F401  (fixture)


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
