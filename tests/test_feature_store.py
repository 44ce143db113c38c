"""The feature store: memory-mapped shards, incremental and resumable extraction, concurrent writers."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from mmkd.features import FeatureStore, extract

CLASSES, WIDTH, MODALITIES = 3, 4, 2


def row_key(i: int) -> str:
    return hashlib.sha256(f"row {i}".encode()).hexdigest()[:24]


def fake_outputs(keys: list[str]) -> dict[str, torch.Tensor]:
    """Outputs that depend only on each key, so any process computes the same ones."""
    seeds = torch.tensor([int(key[:6], 16) % 997 for key in keys], dtype=torch.float32)
    return {
        "logits": seeds[:, None] + torch.arange(CLASSES) / 10,
        "embeddings": seeds[:, None] * 2 + torch.arange(WIDTH) / 100,
        "modality_embeddings": seeds[:, None, None] - torch.arange(MODALITIES * WIDTH).reshape(MODALITIES, WIDTH),
    }


class CountingTeacher:
    """Stands in for the teacher's forward pass and counts the rows it was run on."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.rows_seen: list[str] = []
        self.calls = 0

    def __call__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        self.calls += 1
        chosen = [self.keys[p] for p in positions]
        self.rows_seen += chosen
        return fake_outputs(chosen)


def test_round_trip_float32(tmp_path):
    store = FeatureStore(tmp_path, "teacher")
    keys = [row_key(i) for i in range(5)]
    store.add(keys, fake_outputs(keys))
    reopened = FeatureStore(tmp_path, "teacher")
    got = reopened.get_outputs(list(reversed(keys)))
    want = fake_outputs(list(reversed(keys)))
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor)
    logits, embeddings = reopened.get(keys[:2])
    assert torch.equal(logits, want["logits"].flip(0)[:2])
    assert torch.equal(embeddings, want["embeddings"].flip(0)[:2])


def test_shards_are_memory_mapped(tmp_path):
    store = FeatureStore(tmp_path, "teacher")
    keys = [row_key(i) for i in range(4)]
    store.add(keys, fake_outputs(keys))
    shard = FeatureStore(tmp_path, "teacher")._shards[0]
    assert all(isinstance(array, np.memmap) for array in shard.values())


def test_float16_storage_rounds_like_numpy(tmp_path):
    store = FeatureStore(tmp_path, "teacher", dtype="float16")
    keys = [row_key(i) for i in range(6)]
    outputs = {name: tensor + 0.123456 for name, tensor in fake_outputs(keys).items()}
    store.add(keys, outputs)
    got = FeatureStore(tmp_path, "teacher", dtype="float16").get_outputs(keys)
    for name, tensor in outputs.items():
        expected = torch.from_numpy(tensor.numpy().astype(np.float16).astype(np.float32))
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], expected)
    assert store.folder.name == "teacher-float16"


def test_float16_store_is_half_the_size(tmp_path):
    keys = [row_key(i) for i in range(2000)]
    sizes = {}
    for dtype in ("float32", "float16"):
        store = FeatureStore(tmp_path, "teacher", dtype=dtype)
        store.add(keys, fake_outputs(keys))
        arrays = ("logits", "embeddings", "modality_embeddings")
        sizes[dtype] = sum((store.folder / shard / f"{a}.npy").stat().st_size
                           for shard in os.listdir(store.folder) if shard.startswith("shard-") for a in arrays)
    assert sizes["float16"] / sizes["float32"] == pytest.approx(0.5, abs=0.01)


def test_unknown_key_names_first_missing_row(tmp_path):
    store = FeatureStore(tmp_path, "teacher")
    keys = [row_key(i) for i in range(3)]
    store.add(keys[:2], fake_outputs(keys[:2]))
    with pytest.raises(KeyError, match=rf"1 of 3 rows \(first: {keys[2]}\) have no teacher outputs"):
        store.get(keys)


def test_extraction_writes_shards_of_configured_size(tmp_path):
    keys = [row_key(i) for i in range(10)]
    store = FeatureStore(tmp_path, "teacher")
    teacher = CountingTeacher(keys)
    assert extract(store, teacher, keys, shard_rows=4, batch_rows=3) == 10
    assert store.shard_count == 3
    # Shards of 4, 4 and 2 rows, each in batches of at most 3: 2 + 2 + 1 calls.
    assert teacher.calls == 5
    assert teacher.rows_seen == keys


def test_appended_rows_are_the_only_ones_computed(tmp_path):
    keys = [row_key(i) for i in range(30)]
    store = FeatureStore(tmp_path, "teacher")
    first = CountingTeacher(keys[:20])
    assert extract(store, first, keys[:20]) == 20
    second = CountingTeacher(keys)
    assert extract(FeatureStore(tmp_path, "teacher"), second, keys) == 10
    assert second.rows_seen == keys[20:]
    assert torch.equal(FeatureStore(tmp_path, "teacher").get_outputs(keys)["logits"], fake_outputs(keys)["logits"])


def test_duplicate_rows_are_computed_once(tmp_path):
    keys = [row_key(i % 4) for i in range(12)]
    teacher = CountingTeacher(keys)
    assert extract(FeatureStore(tmp_path, "teacher"), teacher, keys) == 4
    assert sorted(teacher.rows_seen) == sorted({*keys})


def test_half_written_shard_is_never_read(tmp_path):
    keys = [row_key(i) for i in range(4)]
    store = FeatureStore(tmp_path, "teacher")
    store.add(keys[:2], fake_outputs(keys[:2]))
    # What a kill during a write leaves: a temporary folder holding some of the files.
    partial = store.folder / ".tmp-shard-00000000000000000001-deadbeef"
    partial.mkdir()
    np.save(partial / "keys.npy", np.asarray(keys[2:], dtype=str))
    reopened = FeatureStore(tmp_path, "teacher")
    assert len(reopened) == 2
    assert reopened.missing(keys) == [2, 3]
    assert reopened.remove_stale_temporaries() == 0
    old = time.time() - 2 * 24 * 3600
    os.utime(partial, (old, old))
    assert reopened.remove_stale_temporaries() == 1
    assert not partial.exists()


WORKER = textwrap.dedent("""
    import hashlib, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_feature_store import CountingTeacher, row_key
    from mmkd.features import FeatureStore, extract

    root, rows, delay = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    keys = [row_key(i) for i in range(rows)]
    teacher = CountingTeacher(keys)

    def slow(positions):
        time.sleep(delay)
        return teacher(positions)

    computed = extract(FeatureStore(root, "teacher"), slow, keys, shard_rows=5, batch_rows=5)
    print(computed, flush=True)
""")


def start_worker(tmp_path, rows: int, delay: float) -> subprocess.Popen:
    script = tmp_path / "extract_worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(__file__)))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(rows), str(delay)],
                            stdout=subprocess.PIPE, text=True)


def test_killed_extraction_resumes_after_last_shard(tmp_path):
    rows = 40
    worker = start_worker(tmp_path, rows, delay=0.2)
    folder = tmp_path / "store" / "teacher-float32"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(folder.glob("shard-*"))) < 2:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    store = FeatureStore(tmp_path / "store", "teacher")
    done = len(store)
    assert done % 5 == 0
    assert 10 <= done < rows
    keys = [row_key(i) for i in range(rows)]
    teacher = CountingTeacher(keys)
    assert extract(store, teacher, keys, shard_rows=5) == rows - done
    assert teacher.rows_seen == keys[done:]
    assert torch.equal(store.get_outputs(keys)["embeddings"], fake_outputs(keys)["embeddings"])


def test_two_extractions_at_once_take_turns(tmp_path):
    rows = 30
    workers = [start_worker(tmp_path, rows, delay=0.05) for _ in range(2)]
    computed = sorted(int(worker.communicate(timeout=120)[0]) for worker in workers)
    assert [worker.returncode for worker in workers] == [0, 0]
    # The lock lets the second find the first's rows: every row is computed once in all.
    assert computed == [0, rows]
    store = FeatureStore(tmp_path / "store", "teacher")
    keys = [row_key(i) for i in range(rows)]
    assert store.missing(keys) == []
    assert torch.equal(store.get_outputs(keys)["logits"], fake_outputs(keys)["logits"])
