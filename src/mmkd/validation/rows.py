"""Facts that relate rows to each other, and each row's problems written for people.

The probe table holds one record per manifest row. `add_dataset_columns` adds the
columns that need the whole table (duplicate ids, content shared across splits or
labels, per-split counts and shares), so the Great Expectations suite can check them like
any other column, and `row_problems` turns one record into the reasons it must be set aside.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import pandas as pd

from mmkd.config import DataConfig, LabelRule
from mmkd.data import wav
from mmkd.manifest import SPLITS, is_utf8

MODALITY_FILES = ("image", "audio")
PROBED_MODALITIES = ("image", "audio", "text")


@dataclass(frozen=True)
class Problem:
    """One reason to set a row aside.

    Attributes:
        row_number: The row's 1-based position among the manifest's data rows.
        row_id: The row's id, or "" when the row has none.
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


def implied_labels(cells: pd.Series, rule: LabelRule) -> tuple[pd.Series, pd.Series]:
    """Return the label each cell implies under `rule`, and whether the cell matched.

    Both results are null where the cell is empty. Without a pattern the cell itself is
    the label. With one, the implied label is the group named `label`, else the first
    group, else the whole match of the first search hit.
    """
    pattern = re.compile(rule.pattern) if rule.pattern is not None else None
    labels: list[str | None] = []
    matched: list[bool | None] = []
    for cell in cells:
        if not _present(cell) or str(cell).strip() == "":
            labels.append(None)
            matched.append(None)
            continue
        if pattern is None:
            labels.append(str(cell).strip())
            matched.append(True)
            continue
        found = pattern.search(str(cell))
        if found is None:
            labels.append(None)
            matched.append(False)
        elif "label" in found.re.groupindex:
            labels.append(found.group("label"))
            matched.append(True)
        else:
            labels.append(found.group(1) if found.re.groups else found.group(0))
            matched.append(True)
    return pd.Series(labels, index=cells.index, dtype=object), pd.Series(matched, index=cells.index, dtype=object)


def add_dataset_columns(
    probes: pd.DataFrame, *, classes: Sequence[str] | None = None, modalities: Sequence[str] = MODALITY_FILES
) -> pd.DataFrame:
    """Return a copy of `probes` with columns that compare rows with each other.

    Added columns:
        id_count: rows that share this row's id (null where the id is missing).
        modality_count: modalities this row has, of image, audio and text.
        image_split_count, audio_split_count: distinct splits whose rows contain this
            row's file content (by sha256); absent where the row has no such file.
        content_label_count: distinct labels among rows whose image, audio and text
            content all equal this row's.
        split_share: the fraction of all rows that are in this row's split.
        class_imbalance: in this row's split, rows of its largest class divided by rows
            of its smallest class, among `classes` (by default the labels present).
            Infinite when a class has no row in the split.
        <modality>_coverage: for each of `modalities`, the fraction of rows in this
            row's split that have the modality.
    """
    table = probes.copy()
    ids = table["id"].where(table["id"].notna() & (table["id"].astype(str).str.strip() != ""))
    table["id_count"] = ids.map(ids.value_counts()).astype("Int64")
    table["modality_count"] = sum(
        table[f"has_{m}"].map(_is_true).astype(int) for m in PROBED_MODALITIES if f"has_{m}" in table
    )
    for modality in MODALITY_FILES:
        digest = table[f"{modality}_sha256"]
        counts = table[digest.notna()].groupby(f"{modality}_sha256")["split"].nunique()
        table[f"{modality}_split_count"] = digest.map(counts).astype("Int64")
    content = table[["image_sha256", "audio_sha256", "text_sha256"]].astype("string").fillna("-").agg("|".join, axis=1)
    table["content_label_count"] = table.groupby(content)["label"].transform("nunique")

    split = table["split"].astype("string").fillna("")
    table["split_share"] = split.map(split.value_counts(normalize=True)).astype(float)
    declared = list(classes) if classes is not None else sorted({str(v) for v in table["label"].dropna()})
    labels = table["label"].astype("string")
    imbalance: dict[str, float] = {}
    for name, rows in labels.groupby(split):
        counts = rows.value_counts().reindex(declared, fill_value=0)
        smallest = int(counts.min()) if len(counts) else 0
        imbalance[name] = float(counts.max()) / smallest if smallest else math.inf
    table["class_imbalance"] = split.map(imbalance).astype(float)
    for modality in modalities:
        has = table[f"has_{modality}"].map(_is_true).astype(float)
        table[f"{modality}_coverage"] = has.groupby(split).transform("mean")
    return table


def row_problems(
    record: Mapping[str, Any],
    *,
    classes: Sequence[str],
    data: DataConfig,
    label_rules: Sequence[LabelRule] = (),
    train_split: str = "train",
) -> list[Problem]:
    """Return every reason to set this probe record's row aside; empty when it is usable.

    `record` is a row of the probe table after `add_dataset_columns`, with the columns
    `label_from_<rule>` and `<rule>_matched` of each label rule added.
    """
    row_id = str(record["id"]) if _present(record.get("id")) else ""
    name = repr(row_id) if row_id else f"number {int(record['row_number'])}"
    problems: list[Problem] = []

    def add(check: str, column: str, value: Any, message: str) -> None:
        text = str(value) if _present(value) else ""
        problems.append(Problem(int(record["row_number"]), row_id, check, column, text, f"row {name}: {message}"))

    _identity_problems(record, row_id, classes, add)
    for modality in MODALITY_FILES:
        if _is_true(record.get(f"has_{modality}")):
            _file_problems(record, modality, train_split, add)
    if _is_true(record.get("has_audio")) and _is_true(record.get("audio_decodes")):
        _audio_problems(record, data, add)
    if _is_true(record.get("has_text")):
        _text_problems(record, data, add)
    for rule in label_rules:
        _label_rule_problems(record, rule, add)

    label_count = record.get("content_label_count")
    if _present(label_count) and int(label_count) > 1:
        add("content_one_label", "label", record.get("label"),
            "the same content appears in other rows with a different label (keep one label per example)")
    return problems


def _identity_problems(record: Mapping[str, Any], row_id: str, classes: Sequence[str], add: Any) -> None:
    if not row_id.strip():
        add("id_present", "id", "", "the id is missing (give every row a unique id)")
    elif not is_utf8(row_id):
        add("id_utf8", "id", row_id, "the id is not valid UTF-8 (save the manifest as UTF-8)")
    if _present(record.get("id_count")) and int(record["id_count"]) > 1:
        add("id_unique", "id", row_id, f"id {row_id!r} is used by {int(record['id_count'])} rows (give each row its own id)")

    label = record.get("label")
    if not _present(label) or str(label).strip() == "":
        add("label_present", "label", "", "the label is missing (give every row a label)")
    elif str(label) not in classes:
        add("label_in_classes", "label", label,
            f"label {label!r} is not one of the declared classes {list(classes)} (add it to data.classes or fix the row)")

    split = record.get("split")
    if _present(split) and str(split) not in SPLITS:
        add("split_valid", "split", split,
            f"split {split!r} is not one of {', '.join(SPLITS)} (fix the cell, or leave it empty to assign one from the id)")
    if _present(record.get("modality_count")) and int(record["modality_count"]) == 0:
        add("has_modality", "", "", "the row has no image, audio or text (fill in at least one, or remove the row)")


def _file_problems(record: Mapping[str, Any], modality: str, train_split: str, add: Any) -> None:
    path = record.get(f"{modality}_path")
    error = record.get(f"{modality}_error")
    if _is_false(record.get(f"{modality}_inside_root")):
        add(f"{modality}_inside_root", modality, path, f"{modality} {path!r} {_escape_reason(str(path))}")
    elif _present(error) and error:
        add(f"{modality}_decodes", modality, path, f"{modality} {path!r} cannot be used: {error}")
    split_count = record.get(f"{modality}_split_count")
    if _present(split_count) and int(split_count) > 1 and record.get("split") != train_split:
        add(f"{modality}_leakage", modality, path,
            f"{modality} {path!r} has the same content as a file in another split (remove the copy or move the rows to one split)")


def _escape_reason(path: str) -> str:
    """Return how a path that resolves outside the data root gets there, with the fix."""
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).anchor:
        return "is an absolute path (write it relative to the data root)"
    normal = posixpath.normpath(path.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        return "leads outside the data root through '..' (move the file inside the data root)"
    return "resolves outside the data root through a symbolic link (copy the file inside the data root)"


def _audio_problems(record: Mapping[str, Any], data: DataConfig, add: Any) -> None:
    path = record.get("audio_path")
    for check, reason in wav.recording_problems(
        sample_rate_hz=int(record["audio_sample_rate_hz"]),
        channels=int(record["audio_channels"]),
        encoding=str(record["audio_encoding"]),
        config=data.audio,
    ):
        add(check, "audio", path, f"audio {path!r} {reason}")
    nonfinite = record.get("audio_nonfinite")
    if _present(nonfinite) and int(nonfinite) > 0:
        add("audio_finite", "audio", path, f"audio {path!r} has {int(nonfinite)} NaN or infinite samples (repair or remove the file)")


def _text_problems(record: Mapping[str, Any], data: DataConfig, add: Any) -> None:
    if _is_true(record.get("text_blank")):
        add("text_not_blank", "text", "", "the text is empty or only whitespace (fill it in or leave the modality out)")
    if _is_false(record.get("text_utf8")):
        add("text_utf8", "text", "", "the text is not valid UTF-8 (save the manifest as UTF-8)")
    chars = record.get("text_chars")
    if _present(chars) and int(chars) > data.text.max_chars:
        add("text_max_chars", "text", "",
            f"the text has {int(chars)} characters, more than data.text.max_chars = {data.text.max_chars} (shorten it or raise the limit)")
    tokens = record.get("text_tokens")
    if data.text.max_tokens is not None and _present(tokens) and int(tokens) > data.text.max_tokens:
        add("text_max_tokens", "text", "",
            f"the text has {int(tokens)} words, more than data.text.max_tokens = {data.text.max_tokens} (shorten it or raise the limit)")


def _label_rule_problems(record: Mapping[str, Any], rule: LabelRule, add: Any) -> None:
    name = rule.check_name
    cell = record.get(f"{name}_cell")
    matched = record.get(f"{name}_matched")
    if _is_false(matched):
        add(f"{name}_matched", rule.column, cell,
            f"{rule.column} {cell!r} does not match the pattern {rule.pattern!r}, so its label cannot be checked "
            "(fix the cell or the pattern in validation.label_rules)")
        return
    implied = record.get(name)
    label = record.get("label")
    if _present(implied) and _present(label) and str(implied) != str(label):
        add(name, rule.column, cell,
            f"{rule.column} {cell!r} implies label {str(implied)!r}, but the row's label is {str(label)!r} "
            "(fix the label or the file)")
