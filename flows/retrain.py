"""Retrain flow: the pipeline, promotion included, on the data that a watcher saw change."""

from __future__ import annotations

from prefect import flow

from mmkd.config import load_config
from mmkd.flows._common import flow_logger
from mmkd.flows.pipeline import pipeline_flow
from mmkd.watching import snapshot_dataset

# Passes of the pipeline one retrain makes while rows keep arriving.
MAX_PASSES = 3


@flow(name="retrain", description="Run the pipeline, promotion included, on the dataset an event names.")
def retrain_flow(
    config_path: str,
    out_dir: str,
    manifest: str | None = None,
    dataset: str | None = None,
    fingerprint: str | None = None,
    new_rows: int | None = None,
) -> dict:
    """Retrain for a `mmkd.dataset.updated` event, whose payload fills the last four parameters.

    Args:
        config_path: The YAML run config.
        out_dir: Folder of the run folders, the caches and the model registry.
        manifest: Replaces the config's manifest (the event names the one that changed).
        dataset: Name of the dataset that changed, for the logs.
        fingerprint: The dataset fingerprint the watcher saw, recorded with the run.
        new_rows: How many rows the watcher found new.

    Returns:
        The run folder, the student's test accuracy and the promotion decision.
    """
    logger = flow_logger()
    logger.info("Retraining for dataset %s: %s new rows, fingerprint %s", dataset or "(config)",
                "?" if new_rows is None else new_rows, (fingerprint or "?")[:12])
    # Events for rows added while the pipeline runs either fall in the trigger's open window
    # or start a run that CANCEL_NEW cancels while this one runs, so this run trains on them.
    data = load_config(config_path).data
    watched = manifest or data.manifest
    for attempt in range(1, MAX_PASSES + 1):
        before = snapshot_dataset(watched, root=data.root).fingerprint
        result = pipeline_flow(config_path, out_dir, manifest=manifest)
        after = snapshot_dataset(watched, root=data.root).fingerprint
        if after == before:
            break
        if attempt < MAX_PASSES:
            logger.info("The data changed while the pipeline ran; running it again on the new rows")
        else:
            logger.warning("The data changed during each of %d passes; rows added during the last one are "
                           "not trained yet, so run the retrain deployment again", MAX_PASSES)
    return {"run_dir": result["run_dir"], "student_accuracy": result["student"]["test"]["accuracy"],
            "dataset_fingerprint": fingerprint, "promotion": result["promotion"]}
