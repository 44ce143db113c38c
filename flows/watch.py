"""Watch flow: fingerprint a dataset and emit `mmkd.dataset.updated` when it changed."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.events import emit_event

from mmkd.flows._common import flow_logger
from mmkd.watching import load_state, save_state, snapshot_dataset

EVENT = "mmkd.dataset.updated"


@flow(name="watch", description="Fingerprint a manifest and its files; emit mmkd.dataset.updated when they changed.")
def watch_flow(manifest: str, state_dir: str = "watch-state", dataset: str | None = None) -> dict:
    """Compare the dataset with the last stored fingerprint, and emit an event if it changed.

    The first tick stores the fingerprint as the baseline and emits nothing. A tick on
    unchanged data emits nothing and reads no file whose size and modification time are
    unchanged. The state is saved only after the event is emitted, so a failed emit is
    retried on the next tick.

    Args:
        manifest: The dataset's manifest.
        state_dir: Folder of the stored fingerprints, one JSON file per dataset.
        dataset: Name of the dataset in events; by default the manifest's folder name.

    Returns:
        changed, baseline, dataset, fingerprint, rows, new_rows and hashed (files read).
    """
    logger = flow_logger()
    manifest_path = Path(manifest).resolve()
    name = dataset or manifest_path.parent.name
    state_path = Path(state_dir) / f"{name}.json"
    previous = load_state(state_path)
    snapshot = snapshot_dataset(manifest_path, previous=previous)
    result = {"dataset": name, "fingerprint": snapshot.fingerprint, "rows": snapshot.rows,
              "hashed": snapshot.hashed, "changed": False, "baseline": previous is None, "new_rows": 0}

    if previous is None:
        save_state(state_path, snapshot)
        logger.info("Dataset %s: %d rows, fingerprint %s stored as the baseline", name, snapshot.rows, snapshot.fingerprint[:12])
        return result
    if snapshot.fingerprint == previous["fingerprint"]:
        logger.info("Dataset %s unchanged (%d rows, %d files read)", name, snapshot.rows, snapshot.hashed)
        return result

    new_rows = len(set(snapshot.row_ids) - set(previous["row_ids"]))
    emit_event(
        EVENT,
        resource={"prefect.resource.id": f"mmkd.dataset.{name}", "prefect.resource.name": name},
        payload={"dataset": name, "manifest": str(manifest_path), "new_rows": new_rows,
                 "rows": snapshot.rows, "fingerprint": snapshot.fingerprint},
    )
    save_state(state_path, snapshot)
    logger.info("Dataset %s changed: %d new rows, %d files read; emitted %s", name, new_rows, snapshot.hashed, EVENT)
    return {**result, "changed": True, "new_rows": new_rows}
