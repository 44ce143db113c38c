"""Run folders and atomic file writes.

A file is written to a temporary name in its destination folder and renamed into place,
so a killed run never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Call `write(tmp_path)` and rename the temporary file onto `path`.

    With `durable`, the file's bytes and then the rename are synced to disk, so that the
    file survives a power cut as well as a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            with open(tmp, "rb+") as stream:
                os.fsync(stream.fileno())
        os.replace(tmp, path)
        if durable:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write UTF-8 text to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> Path:
    """Save a torch object to `path` atomically and synced to disk."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp), durable=True)


def new_run_dir(out_dir: Path, name: str) -> Path:
    """Create and return a fresh folder `out_dir/<UTC time>-<name>` for one pipeline run."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        run_dir = Path(out_dir) / f"{stamp}-{name}{suffix}"
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder under {out_dir}")


def unfinished_run(out_dir: Path, config_fingerprint: str, *, finished_file: str = "metrics.json") -> Path | None:
    """Return the newest run folder under `out_dir` started with this config that did not finish, if any.

    A run folder records its config's fingerprint in run.json when it starts and gets
    `finished_file` when it is done. A folder with the first and not the second was
    stopped, by a kill or an error, before the end.
    """
    for run_dir in sorted((p for p in Path(out_dir).glob("*/run.json")), reverse=True):
        folder = run_dir.parent
        if folder.is_symlink() or (folder / finished_file).exists():
            continue
        try:
            started = json.loads(run_dir.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if started.get("config_fingerprint") == config_fingerprint:
            return folder
    return None


def sha256_of_file(path: Path, *, block_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes, read in blocks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()
