"""Extract flow: run the frozen teacher once per row and cache its outputs."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import load_checkpoint
from mmkd.data.loading import TensorDataset
from mmkd.features import FeatureStore
from mmkd.flows._common import flow_logger, load_run_inputs
from mmkd.training import predict, resolve_device


@task(name="extract-teacher-outputs", description="Run the frozen teacher on rows the feature store lacks.",
      cache_policy=NO_CACHE, tags=["teacher"])
def extract_missing(store: FeatureStore, teacher, dataset: TensorDataset, device_choice: str) -> int:
    """Compute teacher logits and embeddings for rows the store lacks; return how many."""
    missing = store.missing(dataset.keys)
    unique: dict[str, int] = {}
    for position in missing:
        unique.setdefault(dataset.keys[position], position)
    if unique:
        rows = dataset.take(list(unique.values()))
        device = resolve_device(device_choice)
        logits, embeddings = predict(teacher.to(device), rows, device=device)
        store.add(rows.keys, logits, embeddings)
    return len(unique)


@flow(name="extract", description="Cache the frozen teacher's logits and fused features for every row.")
def extract_flow(run_dir: str) -> dict:
    """Fill the feature store for the run's teacher and dataset."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)

    # The store is keyed by the teacher's fingerprint and each row's decoded content.
    teacher, metadata = load_checkpoint(paths.teacher, config)
    store = FeatureStore(paths.feature_store(config), metadata["fingerprint"])
    missing_before = len(store.missing(dataset.keys))
    computed = extract_missing(store, teacher, dataset, config.device)

    reused = len(dataset) - missing_before
    logger.info("Teacher outputs: %d rows computed, %d reused from %s", computed, reused, store.folder)
    return {"rows": len(dataset), "computed": computed, "reused": reused, "store": str(store.folder)}
