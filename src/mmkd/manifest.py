"""Read, validate and write dataset manifests.

A manifest is a CSV, JSONL or Parquet table with one row per example: `id`, `label`,
an optional `split`, and one column per modality. The `image` and `audio` columns
contain file paths relative to the manifest's folder, and `text` contains the text itself. An
empty cell means the row lacks that modality. Other columns are kept unchanged.

Rows without a split get one from a hash of their id, so rows appended to a manifest
later never move an existing row from one split to another.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np
import pandas as pd

from mmkd.errors import DataError

SPLITS = ("train", "val", "test")
PATH_MODALITIES = ("image", "audio")
INLINE_MODALITIES = ("text",)
MODALITIES = PATH_MODALITIES + INLINE_MODALITIES
DEFAULT_SPLIT_FRACTIONS: Mapping[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}

# Longest suffix first, so "a.csv.gz" is not taken for a plain ".gz" file.
_FORMATS = {
    ".csv.gz": "csv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_TEXT_COLUMNS = ("id", "label", "split", *MODALITIES)


def assign_split(row_id: str, fractions: Mapping[str, float], *, salt: str = "") -> str:
    """Pick the split of one row from the sha256 of `salt + row_id`.

    The hash is mapped to a number in [0, 1) and compared with the cumulative
    fractions in the order train, val, test. The result depends only on the id and
    the salt, never on the other rows.

    Args:
        row_id: The row's id.
        fractions: Fraction per split name; missing splits get 0.
        salt: Text prepended to the id, to draw a different split with the same ids.

    Returns:
        One of `SPLITS`.

    Raises:
        DataError: A fraction is outside [0, 1], names an unknown split, or the
            fractions do not sum to 1.
    """
    return _split_from_hash(row_id, _split_bounds(fractions), salt)


def _split_bounds(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    unknown = [name for name in fractions if name not in SPLITS]
    if unknown:
        raise DataError(
            f"Unknown split name(s) in split fractions: {', '.join(map(repr, unknown))}. "
            f"Valid names: {', '.join(SPLITS)}."
        )
    for name, value in fractions.items():
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise DataError(
                f"Split fraction for {name!r} is {value!r}, but it must be a number in [0, 1]."
            )
    total = sum(float(fractions.get(name, 0.0)) for name in SPLITS)
    if abs(total - 1.0) > 1e-6:
        raise DataError(
            f"Split fractions must sum to 1, but {dict(fractions)} sums to {total:.6g}. "
            "Adjust them so they add up to 1."
        )
    bounds: list[tuple[str, float]] = []
    upper = 0.0
    for name in SPLITS:
        fraction = float(fractions.get(name, 0.0))
        if fraction > 0.0:
            upper += fraction
            bounds.append((name, upper))
    return bounds


def _split_from_hash(row_id: str, bounds: list[tuple[str, float]], salt: str) -> str:
    digest = hashlib.sha256((salt + row_id).encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    for name, upper in bounds:
        if position < upper:
            return name
    # The fractions may sum to slightly under 1, so the last split takes the remainder.
    return bounds[-1][0]


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated manifest.

    Attributes:
        path: The manifest file, as an absolute path.
        root: Folder that relative `image` and `audio` paths are resolved against,
            which is the manifest's parent folder.
        frame: One row per example with columns `id`, `label` and `split` (strings),
            one column per modality present (None where a row lacks it), then any
            other columns of the file.
        modalities: Modality columns present, in the order image, audio, text.
        split_assigned: True when some or all splits were computed from id hashes.
    """

    path: Path
    root: Path
    frame: pd.DataFrame
    modalities: tuple[str, ...]
    split_assigned: bool

    def resolve(self, value: str) -> Path:
        """Return the file that a path cell of this manifest refers to."""
        return self.root / value

    def rows(self, split: str | None = None) -> pd.DataFrame:
        """Return the rows of one split, or every row when `split` is None.

        The returned rows keep their index in `frame`.

        Raises:
            DataError: `split` is not one of `SPLITS`.
        """
        if split is None:
            return self.frame
        if split not in SPLITS:
            raise DataError(f"Unknown split {split!r}. Valid splits: {', '.join(SPLITS)}.")
        return self.frame[self.frame["split"] == split]

    def __len__(self) -> int:
        return len(self.frame)


def read_manifest(
    path: str | Path,
    *,
    modalities: Sequence[str] | None = None,
    split_fractions: Mapping[str, float] | None = None,
    split_salt: str = "",
    root: str | Path | None = None,
    bad_rows: Literal["raise", "keep"] = "raise",
) -> Manifest:
    """Read and validate a manifest, assigning splits where it has none.

    The format follows the extension: `.csv` or `.csv.gz`, `.jsonl` or `.ndjson`,
    `.parquet`. Files named in the manifest are not opened here.

    Problems of the file as a whole (missing, unreadable, no rows, a required column
    absent) always raise. Problems of single rows (an empty id or label, a duplicate id,
    no modality, a path that is absolute or leads up through '..', an invalid split,
    bytes that are not UTF-8) raise with `bad_rows="raise"`. With `bad_rows="keep"` those
    rows are returned as written, so that the validate stage can report every one of
    them: empty cells stay None and an invalid split keeps its text.

    Args:
        path: The manifest file.
        modalities: Modality columns that must all be present. By default any one of
            image, audio and text is enough.
        split_fractions: Fractions used for rows without a split. Defaults to
            `DEFAULT_SPLIT_FRACTIONS`.
        split_salt: Salt for the id hash; see `assign_split`.
        root: Folder the image and audio paths are relative to; by default the
            manifest's own folder.
        bad_rows: "raise" or "keep"; see above.

    Raises:
        DataError: The file is missing, unreadable or of an unsupported type, or a
            column or cell is invalid. The message names the file, row and column.
    """
    path = Path(path).resolve()
    data_root = Path(root).resolve() if root is not None else path.parent
    kind = _format_of(path)
    fractions = DEFAULT_SPLIT_FRACTIONS if split_fractions is None else split_fractions
    bounds = _split_bounds(fractions)
    if not path.is_file():
        raise DataError(f"Manifest {path} not found. Check the path, or create the manifest.")

    raw, where = _READERS[kind](path)
    if len(raw) == 0:
        raise DataError(f"Manifest {path} contains no rows. Add rows below the header.")
    present = _check_columns(raw, path, modalities)

    def place(i: int, column: str | None = None) -> str:
        location = f"Manifest {path}, {where[i]}"
        return f"{location}, column {column!r}" if column else location

    text = {column: _text_column(raw, column, place) for column in _TEXT_COLUMNS if column in raw}
    if bad_rows == "keep":
        return _manifest(path, data_root, raw, text, present, _splits(text, bounds, split_salt, None))

    for column, values in text.items():
        for i, value in enumerate(values):
            if value is not None and not is_utf8(value):
                raise DataError(
                    f"{place(i, column)}: the cell is not valid UTF-8 text ({value!r}). "
                    "Save the manifest with UTF-8 encoding."
                )
    first_row: dict[str, int] = {}
    for i, (row_id, label) in enumerate(zip(text["id"], text["label"])):
        for column, value in (("id", row_id), ("label", label)):
            if value is None:
                raise DataError(
                    f"{place(i, column)}: empty {column}. Every row needs an id and a label, "
                    "so fill in the cell or remove the row."
                )
        if row_id in first_row:
            raise DataError(
                f"Manifest {path}: duplicate id {row_id!r} on {where[first_row[row_id]]} "
                f"and {where[i]}. Ids must be unique, so rename or remove one of the two rows."
            )
        first_row[row_id] = i

    for i in range(len(raw)):
        if all(text[column][i] is None for column in present):
            raise DataError(
                f"{place(i)} (id {text['id'][i]!r}): no modality, because the cells of "
                f"{', '.join(present)} are all empty. Fill in at least one, or remove the row."
            )
        for column in present:
            value = text[column][i]
            if column in PATH_MODALITIES and value is not None:
                _check_relative_path(value, place(i, column), data_root)

    return _manifest(path, data_root, raw, text, present, _splits(text, bounds, split_salt, place))


def _manifest(
    path: Path,
    root: Path,
    raw: pd.DataFrame,
    text: Mapping[str, list[str | None]],
    present: tuple[str, ...],
    splits: tuple[list[str | None], bool],
) -> Manifest:
    columns: dict[str, pd.Series] = {
        "id": pd.Series(text["id"], dtype=object),
        "label": pd.Series(text["label"], dtype=object),
        "split": pd.Series(splits[0], dtype=object),
    }
    for column in present:
        columns[column] = pd.Series(text[column], dtype=object)
    for column in raw.columns:
        if column not in columns and column not in MODALITIES:
            columns[column] = raw[column].reset_index(drop=True)
    return Manifest(path=path, root=root, frame=pd.DataFrame(columns), modalities=present, split_assigned=splits[1])


def is_utf8(value: str) -> bool:
    """Tell whether text decoded with errors="surrogateescape" came from valid UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def label_order(label: str) -> tuple[int, float | str]:
    """Sort numeric labels numerically ("2" before "10") and others alphabetically."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest atomically, in the format its extension names.

    The table goes to a temporary file in the destination folder, which then replaces
    `path`, so a killed process never leaves a half-written manifest. CSV output uses
    "\\n" line endings and gzip output has no timestamp, so equal frames give equal bytes.

    Returns:
        The path written.

    Raises:
        DataError: The extension is not a supported manifest format.
    """
    path = Path(path)
    kind = _format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name rather than mkstemp, so the file gets the usual umask permissions.
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        if kind == "parquet":
            frame.to_parquet(temporary, index=False)
        else:
            with open(temporary, "xb") as raw:
                if path.name.lower().endswith(".gz"):
                    # An empty file name and mtime 0 keep the gzip header free of run details.
                    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
                        _write_text(frame, kind, packed)
                else:
                    _write_text(frame, kind, raw)
                raw.flush()
                os.fsync(raw.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _write_text(frame: pd.DataFrame, kind: str, binary: Any) -> None:
    text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
    try:
        if kind == "csv":
            frame.to_csv(text, index=False, lineterminator="\n")
        else:
            for record in frame.to_dict(orient="records"):
                cleaned = {key: _json_value(value) for key, value in record.items()}
                text.write(json.dumps(cleaned, ensure_ascii=False, default=str) + "\n")
        text.flush()
    finally:
        # Detach so that closing the text layer leaves the binary file open for the caller.
        text.detach()


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in _FORMATS.items():
        if name.endswith(suffix):
            return kind
    found = "".join(path.suffixes) or "no extension"
    raise DataError(
        f"Manifest {path}: unsupported file type ({found}). Supported: "
        f"{', '.join(_FORMATS)}. Convert the file or rename it with the matching extension."
    )


def _read_csv(path: Path) -> tuple[pd.DataFrame, list[str]]:
    try:
        # Only empty cells count as missing, so an id such as "NA" stays text.
        # Bytes that are not UTF-8 become lone surrogates, so that the rows holding them
        # can be named instead of the whole file failing.
        frame = pd.read_csv(
            path,
            # object, not str: pandas' string dtype cannot hold the lone surrogates.
            dtype={column: object for column in _TEXT_COLUMNS},
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8",
            encoding_errors="surrogateescape",
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"Manifest {path} is not a readable CSV file: {error}") from error
    lines = _csv_record_lines(path)
    if len(lines) != len(frame):
        # The csv module and pandas disagree on the record count, so use row numbers.
        return frame, [f"row {i + 1}" for i in range(len(frame))]
    return frame, [f"line {line}" for line in lines]


def _csv_record_lines(path: Path) -> list[int]:
    """Return the line each data record starts on, counting quoted line breaks."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    starts: list[int] = []
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="") as stream:
        reader = csv.reader(stream)
        previous_end = 0
        for record in reader:
            if record:
                starts.append(previous_end + 1)
            previous_end = reader.line_num
    return starts[1:]


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[str]]:
    records: list[dict[str, Any]] = []
    where: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"Manifest {path}, line {number}: invalid JSON ({error.msg}). "
                        "Each line must hold one JSON object."
                    ) from error
                if not isinstance(record, dict):
                    raise DataError(
                        f"Manifest {path}, line {number}: expected a JSON object, found "
                        f"{type(record).__name__}. Each line must hold one JSON object."
                    )
                records.append(record)
                where.append(f"line {number}")
    except UnicodeDecodeError as error:
        raise DataError(f"Manifest {path} is not UTF-8 text: {error}") from error
    return pd.DataFrame.from_records(records), where


def _read_parquet(path: Path) -> tuple[pd.DataFrame, list[str]]:
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise DataError(f"Manifest {path} is not a readable Parquet file: {error}") from error
    return frame.reset_index(drop=True), [f"row {i + 1}" for i in range(len(frame))]


_READERS: dict[str, Callable[[Path], tuple[pd.DataFrame, list[str]]]] = {
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


def _check_columns(
    frame: pd.DataFrame, path: Path, modalities: Sequence[str] | None
) -> tuple[str, ...]:
    found = ", ".join(map(str, frame.columns)) or "none"
    missing = [column for column in ("id", "label") if column not in frame.columns]
    if missing:
        raise DataError(
            f"Manifest {path}: missing required column(s) {', '.join(missing)}. Found "
            f"columns: {found}. A manifest needs the columns id and label and at least one "
            f"of {', '.join(MODALITIES)}. Add the missing column(s) to the header."
        )
    if modalities is not None:
        unknown = [name for name in modalities if name not in MODALITIES]
        if unknown:
            raise DataError(
                f"Unknown modality name(s) {', '.join(map(repr, unknown))}. "
                f"Known modalities: {', '.join(MODALITIES)}."
            )
        absent = [name for name in modalities if name not in frame.columns]
        if absent:
            raise DataError(
                f"Manifest {path}: missing modality column(s) {', '.join(absent)}, which "
                f"are required here. Found columns: {found}. Add the column(s), or "
                "request only the modalities the manifest has."
            )
    present = tuple(name for name in MODALITIES if name in frame.columns)
    if not present:
        raise DataError(
            f"Manifest {path}: no modality column. Found columns: {found}. Add at least "
            f"one of the columns {', '.join(MODALITIES)}."
        )
    return present


def _text_column(
    frame: pd.DataFrame, column: str, place: Callable[[int, str | None], str]
) -> list[str | None]:
    values: list[str | None] = []
    for i, value in enumerate(frame[column].tolist()):
        try:
            # Whitespace-only text is kept, so that validation reports it instead of
            # treating the row as one without text.
            if column == "text" and isinstance(value, str) and value:
                values.append(value)
                continue
            values.append(_as_text(value))
        except TypeError as error:
            raise DataError(f"{place(i, column)}: {error}. Write the cell as text.") from error
    return values


def _as_text(value: Any) -> str | None:
    """Return a cell as text, or None when it is empty, NaN or null."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # A label column read as numbers must give "3", not "3.0".
        return str(int(value)) if value.is_integer() else repr(value)
    raise TypeError(f"expected text or a number, found {type(value).__name__} {value!r}")


def _check_relative_path(value: str, location: str, root: Path) -> None:
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).anchor:
        raise DataError(
            f"{location}: absolute path {value!r}. Paths are relative to the manifest "
            f"folder {root}, so write the path relative to that folder."
        )
    normal = posixpath.normpath(value.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise DataError(
            f"{location}: path {value!r} leads outside the manifest folder {root} through "
            "'..'. Paths must stay inside the manifest folder, so move the file or the manifest."
        )


def _splits(
    text: Mapping[str, list[str | None]],
    bounds: list[tuple[str, float]],
    salt: str,
    place: Callable[[int, str | None], str] | None,
) -> tuple[list[str | None], bool]:
    """Return each row's split, assigning one from the id hash where the cell is empty.

    With `place` None, an invalid split is kept as written, and a row without id or split
    gets None, for the validate stage to report. Otherwise an invalid split raises.
    """
    split_cells = text.get("split", [None] * len(text["id"]))
    splits: list[str | None] = []
    assigned = False
    for i, (row_id, split) in enumerate(zip(text["id"], split_cells)):
        if split is None:
            splits.append(_split_from_hash(row_id, bounds, salt) if row_id is not None else None)
            assigned = True
        elif split in SPLITS or place is None:
            splits.append(split)
        else:
            raise DataError(
                f"{place(i, 'split')}: invalid split {split!r}. Valid values: "
                f"{', '.join(SPLITS)}, or an empty cell to assign one from the id."
            )
    return splits, assigned
