"""Tests of the Great Expectations checks on small hand-made probe tables, with real GX runs."""

from __future__ import annotations

import os
from pathlib import Path

import great_expectations as gx
import pandas as pd
import pytest

from mmkd.config import LabelRule
from mmkd.errors import DataError
from mmkd.validation.gx_suite import Check, build_checks, build_dataset_checks, run_suite
from mmkd.validation.rows import add_dataset_columns, implied_labels

CLASSES = ["0", "1"]


def make_probes(rows: int = 6) -> pd.DataFrame:
    """Build a probe table that passes every check: half the rows have an image, all have audio."""
    with_image = [index < rows // 2 for index in range(rows)]

    def image_value(value: object) -> list[object]:
        return [value if present else None for present in with_image]

    return pd.DataFrame(
        {
            # Row numbers start at 2 so that a report that used the DataFrame index would fail.
            "row_number": range(2, rows + 2),
            "id": [f"clip-{index}" for index in range(rows)],
            "label": [CLASSES[index % 2] for index in range(rows)],
            "split": ["train"] * rows,
            "has_image": with_image,
            "has_audio": [True] * rows,
            # Nullable booleans with <NA> where a row has no image, as a probe may write them.
            "image_exists": pd.array(image_value(True), dtype="boolean"),
            "image_inside_root": pd.array(image_value(True), dtype="boolean"),
            "image_decodes": pd.array(image_value(True), dtype="boolean"),
            "image_width": image_value(28),
            "image_height": image_value(28),
            "image_channels": image_value(1),
            "audio_exists": [True] * rows,
            "audio_inside_root": [True] * rows,
            "audio_decodes": [True] * rows,
            "audio_sample_rate_hz": [8000] * rows,
            "audio_channels": [1] * rows,
            "audio_duration_s": [0.6] * rows,
            "audio_nonfinite": [0] * rows,
            "audio_silent": [False] * rows,
            "text_blank": [False] * rows,
            "text_utf8": [True] * rows,
        }
    )


def make_checks(min_rows_per_class: int = 2) -> list[Check]:
    return build_checks(
        classes=CLASSES,
        sample_rate_hz=8000,
        min_rows_per_class=min_rows_per_class,
        image_size=(28, 28),
        image_channels=1,
        audio_channels=1,
        max_audio_duration_s=2.0,
        splits=["train", "val", "test"],
    )


def failed_checks(report: dict) -> dict[str, dict]:
    return {check["name"]: check for check in report["checks"] if not check["success"]}


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def test_clean_table_passes(tmp_path: Path) -> None:
    checks = make_checks()
    report = run_suite(make_probes(), checks, run_dir=tmp_path / "run")

    assert failed_checks(report) == {}
    assert report["success"] is True
    assert report["critical_failures"] == 0
    assert report["warning_failures"] == 0
    assert report["row_count"] == 6
    assert [check["name"] for check in report["checks"]] == [check.name for check in checks]


def test_faulty_rows_fail_their_checks(tmp_path: Path) -> None:
    probes = make_probes()
    probes.loc[1, "id"] = "clip-0"
    probes.loc[2, "audio_sample_rate_hz"] = 44100
    probes.loc[3, "audio_nonfinite"] = 17
    probes.loc[4, "label"] = "7"

    report = run_suite(probes, make_checks(min_rows_per_class=1), run_dir=tmp_path / "run")
    failed = failed_checks(report)

    assert set(failed) == {"id_unique", "audio_sample_rate", "audio_finite", "label_in_classes"}
    assert report["critical_failures"] == 4
    assert report["success"] is False
    assert failed["id_unique"]["failing_rows"] == [
        {"row_number": 2, "id": "clip-0"},
        {"row_number": 3, "id": "clip-0"},
    ]
    assert failed["audio_sample_rate"]["failing_rows"] == [{"row_number": 4, "id": "clip-2"}]
    assert failed["audio_finite"]["failing_rows"] == [{"row_number": 5, "id": "clip-3"}]
    assert failed["label_in_classes"]["failing_rows"] == [{"row_number": 6, "id": "clip-4"}]
    assert failed["audio_sample_rate"]["unexpected_count"] == 1


def test_silent_recording_is_only_a_warning(tmp_path: Path) -> None:
    probes = make_probes()
    probes.loc[5, "audio_silent"] = True

    report = run_suite(probes, make_checks(), run_dir=tmp_path / "run")
    failed = failed_checks(report)

    assert set(failed) == {"audio_not_silent"}
    assert failed["audio_not_silent"]["severity"] == "warning"
    assert failed["audio_not_silent"]["failing_rows"] == [{"row_number": 7, "id": "clip-5"}]
    assert report["critical_failures"] == 0
    assert report["warning_failures"] == 1
    assert report["success"] is True


def test_missing_image_flags_ignored_without_image(tmp_path: Path) -> None:
    # A row without an image may still carry False flags, so the row condition must skip it.
    probes = make_probes()
    probes["image_exists"] = probes["image_exists"].fillna(False)

    report = run_suite(probes, make_checks(), run_dir=tmp_path / "run")

    assert failed_checks(report) == {}


def test_missing_image_fails_for_row_with_image(tmp_path: Path) -> None:
    probes = make_probes()
    probes.loc[0, "image_exists"] = False

    report = run_suite(probes, make_checks(), run_dir=tmp_path / "run")
    failed = failed_checks(report)

    assert set(failed) == {"image_exists"}
    assert failed["image_exists"]["failing_rows"] == [{"row_number": 2, "id": "clip-0"}]


def test_small_class_fails_min_rows(tmp_path: Path) -> None:
    report = run_suite(make_probes(), make_checks(min_rows_per_class=4), run_dir=tmp_path / "run")
    failed = failed_checks(report)

    assert set(failed) == {"min_rows_per_class:0", "min_rows_per_class:1"}
    assert failed["min_rows_per_class:0"]["observed_value"] == 3


def test_missing_column_reported_as_failure(tmp_path: Path) -> None:
    probes = make_probes().drop(columns=["audio_silent"])

    report = run_suite(probes, make_checks(), run_dir=tmp_path / "run")
    failed = failed_checks(report)

    assert set(failed) == {"audio_not_silent"}
    assert "audio_silent" in failed["audio_not_silent"]["exception"]
    assert report["warning_failures"] == 1
    assert report["critical_failures"] == 0


def test_gx_writes_only_inside_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    cwd = tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run"
    before = files_under(tmp_path)

    report = run_suite(make_probes(), make_checks(), run_dir=run_dir)

    new_files = files_under(tmp_path) - before
    assert new_files
    outside = sorted(str(path) for path in new_files if not path.is_relative_to(run_dir))
    assert outside == []
    assert not (cwd / "gx").exists()
    assert list(home.iterdir()) == []
    index = Path(report["data_docs_index"])
    assert index.is_file()
    assert index.name == "index.html"
    assert index.is_relative_to(run_dir)
    assert list((run_dir / "gx" / "uncommitted" / "data_docs").rglob("validations/**/*.html"))


def test_gx_analytics_off(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_suite(make_probes(), make_checks(), run_dir=run_dir)

    context = gx.get_context(mode="file", project_root_dir=run_dir)

    assert os.environ["GX_ANALYTICS_ENABLED"] == "False"
    assert context.config.analytics_enabled is False
    assert context.variables.analytics_enabled is False


def test_gx_opens_no_network_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    attempts: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def record(self: socket.socket, address: object) -> None:
        attempts.append(address)
        real_connect(self, address)

    def record_ex(self: socket.socket, address: object) -> int:
        attempts.append(address)
        return real_connect_ex(self, address)

    # Outgoing TCP connections (HTTP included) start with connect or connect_ex, so any
    # made while a fresh project is created, validated and rendered is recorded here.
    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.setattr(socket.socket, "connect_ex", record_ex)
    run_suite(make_probes(), make_checks(), run_dir=tmp_path / "run")

    assert attempts == []


def test_second_run_in_same_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    checks = make_checks()
    probes = make_probes()
    probes.loc[5, "audio_silent"] = True

    first = run_suite(probes, checks, run_dir=run_dir)
    second = run_suite(probes, checks, run_dir=run_dir)

    assert first["checks"] == second["checks"]
    assert first["data_docs_index"] == second["data_docs_index"]
    context = gx.get_context(mode="file", project_root_dir=run_dir)
    assert len(context.suites.all()) == 1
    assert len(context.suites.all()[0].expectations) == len(checks)


def test_suite_carries_check_name_and_severity(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    checks = make_checks()
    run_suite(make_probes(), checks, run_dir=run_dir)

    suite = gx.get_context(mode="file", project_root_dir=run_dir).suites.all()[0]
    stored = {expectation.meta["mmkd_check"]: expectation for expectation in suite.expectations}

    assert set(stored) == {check.name for check in checks}
    for check in checks:
        assert stored[check.name].meta["mmkd_severity"] == check.severity
        assert stored[check.name].severity.value == check.severity


def test_probe_table_without_row_number_rejected(tmp_path: Path) -> None:
    probes = make_probes().drop(columns=["row_number"])

    with pytest.raises(DataError, match=r"probe table is missing column\(s\) \['row_number'\]"):
        run_suite(probes, make_checks(), run_dir=tmp_path / "run")


def test_duplicate_check_names_rejected(tmp_path: Path) -> None:
    checks = make_checks()

    with pytest.raises(ValueError, match=r"duplicate check names \['id_unique'\]"):
        run_suite(make_probes(), [*checks, checks[2]], run_dir=tmp_path / "run")


def test_duplicate_expectations_rejected(tmp_path: Path) -> None:
    checks = make_checks()
    copy = Check(
        name="id_unique_again",
        severity="critical",
        expectation=checks[2].expectation,
        description="No two rows share an id.",
    )

    with pytest.raises(ValueError, match="would run only one of them"):
        run_suite(make_probes(), [*checks, copy], run_dir=tmp_path / "run")


def test_unknown_severity_rejected() -> None:
    expectation = gx.expectations.ExpectColumnValuesToBeUnique(column="id")

    with pytest.raises(ValueError, match="invalid severity 'error', expected 'critical' or 'warning'"):
        Check(
            name="ids",
            severity="error",  # type: ignore[arg-type]
            expectation=expectation,
            description="Ids are unique.",
        )


def test_build_checks_rejects_empty_classes() -> None:
    with pytest.raises(ValueError, match="classes is empty"):
        build_checks(classes=[], sample_rate_hz=8000, min_rows_per_class=1)


def test_dataset_checks_find_split_class_and_coverage_gaps(tmp_path: Path) -> None:
    # Train: classes 0, 0, 0, 1 with audio on two rows. Val: one row of class 0, no audio. Test: empty.
    probes = pd.DataFrame({
        "row_number": range(1, 6),
        "id": list("abcde"),
        "label": ["0", "0", "0", "1", "0"],
        "split": ["train"] * 4 + ["val"],
        "has_image": [True] * 5,
        "has_audio": [True, True, False, False, False],
        "has_text": [False] * 5,
        "image_sha256": list("vwxyz"),
        "audio_sha256": ["p", "q", None, None, None],
        "text_sha256": [None] * 5,
    })
    checks = build_dataset_checks(
        classes=CLASSES,
        split_fractions={"train": 0.7, "val": 0.15, "test": 0.15},
        modalities=["image", "audio"],
        min_rows_per_class_per_split=1,
        max_class_imbalance=2.0,
        split_fraction_tolerance=0.04,
        min_modality_coverage=0.5,
    )
    table = add_dataset_columns(probes, classes=CLASSES, modalities=["image", "audio"])
    report = run_suite(table, checks, run_dir=tmp_path / "run")
    failed = failed_checks(report)

    assert set(failed) == {
        "rows_in_split:test",
        "min_rows_per_class_per_split:val:1",
        "min_rows_per_class_per_split:test:0",
        "min_rows_per_class_per_split:test:1",
        # Train contains 4 of 5 rows (80%), more than 70% + 4%; val's 20% is 5% over 15%.
        "split_share:train",
        "split_share:val",
        # Train has 3 rows of class 0 for 1 of class 1; val has none of class 1.
        "class_balance",
        # Val has no audio at all.
        "audio_coverage",
    }
    assert {name for name, check in failed.items() if check["severity"] == "warning"} == {
        "split_share:train", "split_share:val", "class_balance",
    }
    assert failed["audio_coverage"]["observed_value"] == 0.0


def test_label_rule_check_compares_label_with_implied_label(tmp_path: Path) -> None:
    rule = LabelRule(column="audio", pattern=r"(?P<label>\d)_")
    cells = pd.Series(["audio/0_a.wav", "audio/1_b.wav", "audio/x.wav", None])
    implied, matched = implied_labels(cells, rule)
    probes = pd.DataFrame({
        "row_number": range(1, 5), "id": list("abcd"), "label": ["0", "0", "1", "1"],
        "label_from_audio": implied, "label_from_audio_matched": matched,
    })
    checks = [check for check in build_dataset_checks(
        classes=CLASSES, split_fractions={}, modalities=[], min_rows_per_class_per_split=0,
        max_class_imbalance=10.0, split_fraction_tolerance=0.1, min_modality_coverage=0.0, label_rules=[rule],
    ) if check.name.startswith("label_from")]
    report = run_suite(probes, checks, run_dir=tmp_path / "run")
    failed = failed_checks(report)

    assert set(failed) == {"label_from_audio", "label_from_audio_matched"}
    assert [row["id"] for row in failed["label_from_audio"]["failing_rows"]] == ["b"]
    assert [row["id"] for row in failed["label_from_audio_matched"]["failing_rows"]] == ["c"]
