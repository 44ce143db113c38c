"""Dataset fingerprints, and the watch flow's events read back through the Prefect API."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pandas as pd
import pytest

from mmkd.errors import DataError
from mmkd.watching import load_state, save_state, snapshot_dataset


@pytest.fixture
def dataset(tmp_path, small_avdigits):
    """A private copy of the 120-row real data, free to change."""
    folder = tmp_path / "digits"
    shutil.copytree(small_avdigits.parent, folder)
    return folder / "manifest.csv"


def append_rows(manifest, count: int, prefix: str = "new") -> None:
    """Append `count` rows whose files are fresh copies of the first rows' files."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    added = frame.iloc[:count].copy()
    for index in added.index:
        for column in ("image", "audio"):
            source = manifest.parent / added.at[index, column]
            target = source.with_name(f"{prefix}-{index}{source.suffix}")
            shutil.copyfile(source, target)
            added.at[index, column] = str(target.relative_to(manifest.parent))
        added.at[index, "id"] = f"{prefix}-{index}"
    pd.concat([frame, added]).to_csv(manifest, index=False)


def test_snapshot_hashes_every_file_once(dataset):
    first = snapshot_dataset(dataset)
    assert first.rows == 120
    assert first.hashed == 1 + 240  # the manifest and one image and one recording per row
    audio = pd.read_csv(dataset, dtype=str)["audio"][0]
    assert first.files[audio]["sha256"] == hashlib.sha256((dataset.parent / audio).read_bytes()).hexdigest()

    # Unchanged sizes and modification times: nothing is read again.
    second = snapshot_dataset(dataset, previous={"manifest": first.manifest, "files": first.files})
    assert second.hashed == 0
    assert second.fingerprint == first.fingerprint


def test_snapshot_rereads_only_what_changed(dataset):
    first = snapshot_dataset(dataset)
    image = dataset.parent / pd.read_csv(dataset, dtype=str)["image"][5]
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size, other content
    image.write_bytes(bytes(data))
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 1_000_000))

    second = snapshot_dataset(dataset, previous={"manifest": first.manifest, "files": first.files})
    assert second.hashed == 1
    assert second.fingerprint != first.fingerprint


def test_snapshot_counts_appended_rows(dataset):
    first = snapshot_dataset(dataset)
    append_rows(dataset, 3)
    second = snapshot_dataset(dataset, previous={"manifest": first.manifest, "files": first.files})
    assert second.rows == 123
    assert set(second.row_ids) - set(first.row_ids) == {"new-0", "new-1", "new-2"}
    # The manifest and the six new files are read; the 240 old files are not.
    assert second.hashed == 1 + 6


def test_state_round_trips_and_rejects_other_formats(dataset, tmp_path):
    snapshot = snapshot_dataset(dataset)
    path = save_state(tmp_path / "state" / "digits.json", snapshot)
    state = load_state(path)
    assert state["fingerprint"] == snapshot.fingerprint
    assert state["row_ids"] == snapshot.row_ids
    assert load_state(tmp_path / "state" / "none.json") is None
    path.write_text('{"format": 99}', encoding="utf-8")
    with pytest.raises(DataError, match=r"has format 99, expected 1\. Delete it"):
        load_state(path)


def updated_events(dataset_name: str) -> list:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    event_filter = EventFilter(
        event=EventNameFilter(name=["mmkd.dataset.updated"]),
        resource=EventResourceFilter(id=[f"mmkd.dataset.{dataset_name}"]),
    )
    with get_client(sync_client=True) as client:
        # The client's default page of 100 is above the server's limit of 50 in Prefect 3.9.
        return list(client.read_events(filter=event_filter, limit=50).events)


def test_watch_flow_emits_once_per_change(dataset, tmp_path, prefect_server):
    from prefect.events.worker import EventsWorker

    from mmkd.flows.watch import watch_flow

    name = f"digits-{tmp_path.name}"
    state_dir = str(tmp_path / "state")
    baseline = watch_flow(str(dataset), state_dir, name)
    unchanged = watch_flow(str(dataset), state_dir, name)
    append_rows(dataset, 4)
    changed = watch_flow(str(dataset), state_dir, name)
    again = watch_flow(str(dataset), state_dir, name)

    assert (baseline["baseline"], baseline["changed"]) == (True, False)
    assert (unchanged["changed"], unchanged["hashed"]) == (False, 0)
    assert (changed["changed"], changed["new_rows"], changed["rows"]) == (True, 4, 124)
    assert (again["changed"], again["hashed"]) == (False, 0)

    # Events travel to the server in the background: wait until it has stored them.
    EventsWorker.drain_all(timeout=30)
    deadline = time.monotonic() + 30
    while not (events := updated_events(name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(events) == 1
    assert events[0].payload["new_rows"] == 4
    assert events[0].payload["fingerprint"] == changed["fingerprint"]
    assert events[0].payload["dataset"] == name
