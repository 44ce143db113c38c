"""Fingerprints of a dataset: its manifest and every file it names, hashed only where something changed.

A snapshot records each file's size, modification time and sha256. The next snapshot
reuses a file's hash when its size and modification time are unchanged, so a tick over
unchanged data stats every file but reads none. The dataset's fingerprint is the sha256 of
the manifest's hash and of every (path, file hash) pair in sorted order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmkd.errors import DataError
from mmkd.manifest import PATH_MODALITIES, read_manifest
from mmkd.runs import atomic_write_json, sha256_of_file

STATE_FORMAT = 1


@dataclass(frozen=True)
class DatasetSnapshot:
    """The state of a dataset at one moment.

    Attributes:
        fingerprint: sha256 over the manifest and every named file's content.
        rows: Rows of the manifest.
        row_ids: Each row's id, or "#<row number>" for a row without one.
        manifest: Size, modification time and sha256 of the manifest file.
        files: Relative path -> size, modification time and sha256 (or "missing": True).
        hashed: Files whose content was read for this snapshot (the rest reused a hash).
    """

    fingerprint: str
    rows: int
    row_ids: list[str]
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]]
    hashed: int


def _file_facts(path: Path, previous: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """Return a file's size, mtime and hash, and whether its content had to be read."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return {"missing": True}, False
    facts = {"size": status.st_size, "mtime_ns": status.st_mtime_ns}
    if previous and previous.get("size") == facts["size"] and previous.get("mtime_ns") == facts["mtime_ns"]:
        return {**facts, "sha256": previous["sha256"]}, False
    return {**facts, "sha256": sha256_of_file(path)}, True


def snapshot_dataset(
    manifest_path: str | Path, *, root: str | Path | None = None, previous: dict[str, Any] | None = None
) -> DatasetSnapshot:
    """Fingerprint a manifest and the image and audio files it names.

    Args:
        manifest_path: The manifest.
        root: Folder the manifest's paths are relative to; by default its own folder.
        previous: The last stored snapshot (as `load_state` returns it); its hashes are
            reused for files whose size and modification time are unchanged.

    Raises:
        DataError: The manifest is missing or unreadable as a whole.
    """
    manifest = read_manifest(manifest_path, root=root, bad_rows="keep")
    before = previous or {}
    manifest_facts, manifest_read = _file_facts(manifest.path, before.get("manifest"))
    hashed = int(manifest_read)

    files: dict[str, dict[str, Any]] = {}
    old_files = before.get("files", {})
    for modality in PATH_MODALITIES:
        if modality not in manifest.frame.columns:
            continue
        for value in manifest.frame[modality].dropna():
            if value in files:
                continue
            files[value], was_read = _file_facts(manifest.resolve(value), old_files.get(value))
            hashed += was_read

    digest = hashlib.sha256(manifest_facts.get("sha256", "missing").encode())
    for value in sorted(files):
        digest.update(f"\n{value}\t{files[value].get('sha256', 'missing')}".encode())
    row_ids = [str(row_id) if row_id is not None else f"#{number}" for number, row_id in enumerate(manifest.frame["id"], start=1)]
    return DatasetSnapshot(
        fingerprint=digest.hexdigest(),
        rows=len(manifest.frame),
        row_ids=row_ids,
        manifest=manifest_facts,
        files=files,
        hashed=hashed,
    )


def load_state(path: Path) -> dict[str, Any] | None:
    """Return the snapshot stored at `path`, or None when there is none yet.

    Raises:
        DataError: The file exists but is not a snapshot of this format.
    """
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"Watch state {path} is unreadable ({error}). Delete it to start again from the next tick.") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(
            f"Watch state {path} has format {state.get('format') if isinstance(state, dict) else None!r}, "
            f"expected {STATE_FORMAT}. Delete it to start again from the next tick."
        )
    return state


def save_state(path: Path, snapshot: DatasetSnapshot) -> Path:
    """Store a snapshot atomically, so a killed watcher never leaves half a state file."""
    return atomic_write_json(path, {"format": STATE_FORMAT, **asdict(snapshot)})
