"""Extract flow: run the frozen teacher once per row and keep its outputs in the feature store."""

from __future__ import annotations

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import load_checkpoint
from mmkd.config import RunConfig
from mmkd.data.loading import TensorDataset
from mmkd.features import FeatureStore, Outputs, extract
from mmkd.flows._common import flow_logger, load_run_inputs, open_store
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.training import resolve_device


@task(name="extract-teacher-outputs", description="Run the frozen teacher on rows the feature store lacks.",
      cache_policy=NO_CACHE, tags=["teacher"])
def extract_missing(store: FeatureStore, teacher: MultimodalClassifier, dataset: TensorDataset, config: RunConfig) -> int:
    """Compute teacher logits and embeddings for rows the store lacks, a shard at a time; return how many."""
    logger = flow_logger()
    device = resolve_device(config.device)
    teacher = teacher.eval().to(device)
    inputs = dataset.with_modalities(teacher.modalities).model_inputs()

    @torch.no_grad()
    def run_teacher(positions: list[int]) -> Outputs:
        rows = torch.as_tensor(positions)
        logits, embeddings, modality_embeddings = teacher.forward_with_modalities(*(x[rows].to(device) for x in inputs))
        return {"logits": logits.float().cpu(), "embeddings": embeddings.float().cpu(),
                "modality_embeddings": modality_embeddings.float().cpu()}

    return extract(
        store, run_teacher, dataset.keys, shard_rows=config.extract.shard_rows, batch_rows=config.extract.batch_size,
        on_shard=lambda done, total: logger.info("Teacher outputs: %d of %d new rows stored", done, total),
    )


@flow(name="extract", description="Store the frozen teacher's logits and embeddings for every row.")
def extract_flow(run_dir: str) -> dict:
    """Fill the feature store for the run's teacher and dataset."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)

    # The store is keyed by the teacher's fingerprint and each row's decoded content.
    teacher, metadata = load_checkpoint(paths.teacher, config)
    store = open_store(paths, config, metadata["fingerprint"])
    store.remove_stale_temporaries()
    missing_before = len(store.missing(dataset.keys))
    computed = extract_missing(store, teacher, dataset, config)

    reused = len(dataset) - missing_before
    logger.info("Teacher outputs: %d rows computed, %d reused from %s", computed, reused, store.folder)
    return {"rows": len(dataset), "computed": computed, "reused": reused, **store.describe()}
