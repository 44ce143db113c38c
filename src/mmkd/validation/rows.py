"""Facts that relate rows to each other, and each row's problems written for people.

The probe table holds one record per manifest row. `add_dataset_columns` adds the
columns that need the whole table (duplicate ids, content shared across splits or
labels), so the Great Expectations suite can check them like any other column, and
`row_problems` turns one record into the reasons it must be set aside.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

MODALITY_FILES = ("image", "audio")


@dataclass(frozen=True)
class Problem:
    """One reason to set a row aside.

    Attributes:
        row_number: The row's 1-based position among the manifest's data rows.
        row_id: The row's id.
        check: Stable name of the rule that failed, e.g. "audio_sample_rate".
        column: The manifest column at fault.
        value: The offending path or cell, as written in the manifest.
        message: The reason, written for the person fixing the data.
    """

    row_number: int
    row_id: str
    check: str
    column: str
    value: str
    message: str


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def _is_false(value: Any) -> bool:
    """True for False in any of the forms a probe table read back from CSV may hold."""
    return _present(value) and str(value).strip().lower() in ("false", "0")


def _is_true(value: Any) -> bool:
    return _present(value) and str(value).strip().lower() in ("true", "1")


def add_dataset_columns(probes: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of `probes` with columns that compare rows with each other.

    Added columns:
        id_count: rows that share this row's id.
        image_split_count, audio_split_count: distinct splits whose rows contain this
            row's file content (by sha256); absent where the row has no such file.
        content_label_count: distinct labels among rows whose image, audio and text
            content all equal this row's.
    """
    table = probes.copy()
    table["id_count"] = table.groupby("id", dropna=False)["id"].transform("size")
    for modality in MODALITY_FILES:
        digest = table[f"{modality}_sha256"]
        counts = table[digest.notna()].groupby(f"{modality}_sha256")["split"].nunique()
        table[f"{modality}_split_count"] = digest.map(counts).astype("Int64")
    content = table[["image_sha256", "audio_sha256", "text_sha256"]].astype("string").fillna("-").agg("|".join, axis=1)
    table["content_label_count"] = table.groupby(content)["label"].transform("nunique")
    return table


def row_problems(
    record: Mapping[str, Any],
    *,
    classes: Sequence[str],
    sample_rate_hz: int,
    train_split: str = "train",
) -> list[Problem]:
    """Return every reason to set this probe record's row aside; empty when it is usable.

    `record` is a row of the probe table after `add_dataset_columns`.
    """
    row_id = str(record["id"])
    problems: list[Problem] = []

    def add(check: str, column: str, value: Any, message: str) -> None:
        problems.append(Problem(int(record["row_number"]), row_id, check, column, str(value), f"row {row_id!r}: {message}"))

    label = record.get("label")
    if not _present(label) or str(label).strip() == "":
        add("label_present", "label", "", "the label is missing (give every row a label)")
    elif str(label) not in classes:
        add("label_in_classes", "label", label,
            f"label {label!r} is not one of the declared classes {list(classes)} (add it to data.classes or fix the row)")
    if int(record.get("id_count") or 1) > 1:
        add("id_unique", "id", row_id, f"id {row_id!r} is used by {int(record['id_count'])} rows (give each row its own id)")

    for modality in MODALITY_FILES:
        if not _is_true(record.get(f"has_{modality}")):
            continue
        path = record.get(f"{modality}_path")
        error = record.get(f"{modality}_error")
        if _is_false(record.get(f"{modality}_inside_root")):
            add(f"{modality}_inside_root", modality, path,
                f"{modality} {path!r} lies outside the data root (use a path inside the manifest's folder)")
        elif _present(error) and error:
            add(f"{modality}_decodes", modality, path, f"{modality} {path!r} cannot be used: {error}")
        split_count = record.get(f"{modality}_split_count")
        if _present(split_count) and int(split_count) > 1 and record.get("split") != train_split:
            add(f"{modality}_leakage", modality, path,
                f"{modality} {path!r} has the same content as a file in another split (remove the copy or move the rows to one split)")

    rate = record.get("audio_sample_rate_hz")
    if _is_true(record.get("has_audio")) and _present(rate) and int(rate) != sample_rate_hz:
        add("audio_sample_rate", "audio", record.get("audio_path"),
            f"audio {record.get('audio_path')!r} is {int(rate)} Hz, expected {sample_rate_hz} Hz "
            "(set data.audio.sample_rate_hz or resample the file)")
    nonfinite = record.get("audio_nonfinite")
    if _is_true(record.get("has_audio")) and _present(nonfinite) and int(nonfinite) > 0:
        add("audio_finite", "audio", record.get("audio_path"),
            f"audio {record.get('audio_path')!r} has {int(nonfinite)} NaN or infinite samples (repair or remove the file)")
    if _is_true(record.get("has_text")) and _is_true(record.get("text_blank")):
        add("text_not_blank", "text", "", "the text is empty or only whitespace (fill it in or leave the modality out)")

    label_count = record.get("content_label_count")
    if _present(label_count) and int(label_count) > 1:
        add("content_one_label", "label", label,
            "the same content appears in other rows with a different label (keep one label per example)")
    return problems
