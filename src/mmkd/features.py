"""The feature store: teacher outputs computed once, kept on disk in memory-mapped shards.

A store folder contains the outputs of one teacher (its fingerprint covers weights and
architecture) at one storage dtype. Rows are keyed by a hash of their decoded content,
so the preprocessing is part of the key as well. Each shard is a folder of .npy files:

    keys.npy                   (rows,) row keys
    logits.npy                 (rows, classes)
    embeddings.npy             (rows, fused width)
    modality_embeddings.npy    (rows, modalities, width), each modality's embedding
    layer-<module>.npy         (rows, width), chosen teacher layers averaged over their
                               positions, when the store was opened with `layers`

A shard is written under a temporary name, synced, then renamed into place, so a shard
that a killed extraction left half-written is never read, and extraction resumes after
the last complete shard. Extraction takes an exclusive lock on the folder, so two runs
extracting at once take turns: the second finds the first's rows and computes only the
rest. Readers take no lock; they see complete shards only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

OUTPUTS = ("logits", "embeddings", "modality_embeddings")
DTYPES = ("float32", "float16")
STALE_TEMP_SECONDS = 24 * 3600

# Teacher outputs for a batch of rows: name -> tensor with rows first.
Outputs = dict[str, torch.Tensor]


def layer_output(module: str) -> str:
    """Return the store's output name for the averaged output of teacher module `module`."""
    return f"layer-{module}"


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureStore:
    """Stored teacher outputs for one teacher fingerprint and storage dtype.

    Args:
        root: Folder shared by every teacher's store.
        teacher_fingerprint: Hash of the teacher's weights and architecture.
        dtype: "float32", or "float16" to halve the disk space; outputs are returned as float32.
        layers: Teacher modules whose averaged outputs are stored too; they are part of the
            store's folder name, so a store never lacks a layer its users expect.
    """

    def __init__(self, root: Path, teacher_fingerprint: str, *, dtype: str = "float32", layers: list[str] | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature store dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.dtype = dtype
        self.layers = list(layers) if layers else None
        self.outputs = OUTPUTS + tuple(layer_output(name) for name in layers or [])
        suffix = f"-layers-{hashlib.sha256(json.dumps(sorted(layers)).encode()).hexdigest()[:8]}" if layers else ""
        self.folder = Path(root) / f"{teacher_fingerprint}-{dtype}{suffix}"
        self._index: dict[str, tuple[int, int]] = {}
        self._shards: list[dict[str, np.ndarray]] = []
        self._seen: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Pick up shards that other processes completed since this store was opened."""
        if not self.folder.is_dir():
            return
        for shard in sorted(p for p in self.folder.glob("shard-*") if p.is_dir()):
            if shard.name in self._seen:
                continue
            arrays = {name: np.load(shard / f"{name}.npy", mmap_mode="r") for name in self.outputs}
            keys = np.load(shard / "keys.npy")
            number = len(self._shards)
            self._shards.append(arrays)
            self._seen.add(shard.name)
            for position, key in enumerate(keys.tolist()):
                self._index.setdefault(key, (number, position))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    def missing(self, keys: list[str]) -> list[int]:
        """Return the positions in `keys` that have no stored outputs."""
        return [i for i, key in enumerate(keys) if key not in self._index]

    def missing_unique(self, keys: list[str]) -> list[int]:
        """Return one position in `keys` for each distinct key that has no stored outputs, in order."""
        first: dict[str, int] = {}
        for position in self.missing(keys):
            first.setdefault(keys[position], position)
        return list(first.values())

    def add(self, keys: list[str], outputs: Outputs) -> Path:
        """Write the outputs of `keys` as one new shard and return its folder.

        `outputs` maps each of the store's output names to a tensor whose first dimension matches `keys`.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        temporary = self.folder / f".tmp-{name}"
        temporary.mkdir()
        try:
            arrays = {"keys": np.asarray(keys, dtype=str)}
            for output in self.outputs:
                array = outputs[output].detach().cpu().numpy().astype(self.dtype)
                if len(array) != len(keys):
                    raise ValueError(f"{output} has {len(array)} rows for {len(keys)} keys")
                arrays[output] = array
            for array_name, array in arrays.items():
                with open(temporary / f"{array_name}.npy", "wb") as handle:
                    np.save(handle, array)
                    handle.flush()
                    os.fsync(handle.fileno())
            _fsync_folder(temporary)
            os.rename(temporary, self.folder / name)
            _fsync_folder(self.folder)
        finally:
            if temporary.exists():
                shutil.rmtree(temporary)
        self.refresh()
        return self.folder / name

    def get(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return stored (logits, fused embeddings) for `keys`, in order, as float32.

        Raises:
            KeyError: some keys were never extracted; run the extract stage first.
        """
        found = self.get_outputs(keys, ("logits", "embeddings"))
        return found["logits"], found["embeddings"]

    def get_outputs(self, keys: list[str], names: tuple[str, ...] | None = None) -> Outputs:
        """Return the stored outputs `names` (by default all) for `keys`, in order, as float32 tensors."""
        names = self.outputs if names is None else names
        missing = self.missing(keys)
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(keys)} rows (first: {keys[missing[0]]}) have no teacher outputs in "
                f"{self.folder}; run the extract stage first"
            )
        located = [self._index[key] for key in keys]
        result = {}
        for name in names:
            rows = np.stack([self._shards[shard][name][position] for shard, position in located]) if keys else np.zeros(0)
            result[name] = torch.from_numpy(rows.astype(np.float32))
        return result

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Take the store's extraction lock: other extractions wait, readers do not."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def remove_stale_temporaries(self, older_than_s: float = STALE_TEMP_SECONDS) -> int:
        """Delete half-written shards left by killed extractions; return how many."""
        removed = 0
        for temporary in self.folder.glob(".tmp-shard-*"):
            if time.time() - temporary.stat().st_mtime > older_than_s:
                shutil.rmtree(temporary, ignore_errors=True)
                removed += 1
        return removed

    def describe(self) -> dict:
        """Rows, shards and bytes on disk, for logs and reports."""
        size = sum(f.stat().st_size for f in self.folder.rglob("*.npy")) if self.folder.is_dir() else 0
        return {"folder": str(self.folder), "rows": len(self), "shards": self.shard_count, "bytes": size,
                "dtype": self.dtype}


def extract(
    store: FeatureStore,
    run_teacher: Callable[[list[int]], Outputs],
    keys: list[str],
    *,
    shard_rows: int = 4096,
    batch_rows: int = 256,
    on_shard: Callable[[int, int], None] | None = None,
) -> int:
    """Compute and store the outputs of every row of `keys` that the store lacks.

    Rows are visited in order and written a shard at a time, so memory contains at most one
    shard's outputs whatever the number of rows, and a killed extraction loses at most
    the shard in progress. Rows sharing a key are computed once.

    Args:
        store: Where outputs go.
        run_teacher: Maps row positions in `keys` (at most `batch_rows` of them) to outputs.
        keys: Every row's content key.
        shard_rows: Rows per shard.
        batch_rows: Rows per teacher call.
        on_shard: Called with (rows written so far, rows to write) after each shard.

    Returns:
        How many rows were computed.
    """
    with store.locked():
        store.refresh()
        positions = store.missing_unique(keys)
        written = 0
        for start in range(0, len(positions), shard_rows):
            shard_positions = positions[start : start + shard_rows]
            parts: list[Outputs] = [
                run_teacher(shard_positions[i : i + batch_rows]) for i in range(0, len(shard_positions), batch_rows)
            ]
            outputs = {name: torch.cat([part[name] for part in parts]) for name in store.outputs}
            store.add([keys[p] for p in shard_positions], outputs)
            written += len(shard_positions)
            if on_shard is not None:
                on_shard(written, len(positions))
        return written

