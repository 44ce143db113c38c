"""Extract flow: run the frozen teacher once per row and keep its outputs in the feature store."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import load_checkpoint
from mmkd.config import ExtractConfig, RunConfig
from mmkd.data.loading import TensorDataset, decode_to_cache, load_decoded
from mmkd.errors import ConfigError
from mmkd.features import FeatureStore, Outputs, extract
from mmkd.interpret import capture_layers
from mmkd.flows._common import flow_logger, load_run_inputs, open_store
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.training import resolve_device


@task(name="extract-teacher-outputs", description="Run the frozen teacher on rows the feature store lacks.",
      cache_policy=NO_CACHE, tags=["teacher"])
def extract_missing(store: FeatureStore, teacher: MultimodalClassifier, dataset: TensorDataset, config: RunConfig) -> int:
    """Compute teacher logits and embeddings for rows the store lacks, a shard at a time; return how many."""
    logger = flow_logger()
    inputs = dataset.with_modalities(teacher.modalities).model_inputs()
    return extract(
        store, teacher_on_rows(teacher, inputs, store.outputs, config), dataset.keys,
        shard_rows=config.extract.shard_rows, batch_rows=config.extract.batch_size,
        on_shard=lambda done, total: logger.info("Teacher outputs: %d of %d new rows stored", done, total),
    )


def teacher_on_rows(teacher: MultimodalClassifier, inputs: tuple[torch.Tensor, ...], outputs: tuple[str, ...],
                    config: RunConfig) -> Callable[[list[int]], Outputs]:
    """Return the function that computes the store's `outputs` for chosen rows of `inputs`, on the run's device."""
    device = resolve_device(config.device)
    teacher = teacher.eval().to(device)
    layers = [name.removeprefix("layer-") for name in outputs if name.startswith("layer-")]
    captured, _ = capture_layers(teacher, layers, setting="extract.layers", owner="the teacher")

    @torch.no_grad()
    def run_teacher(positions: list[int]) -> Outputs:
        rows = torch.as_tensor(positions)
        logits, embeddings, modality_embeddings = teacher.forward_with_modalities(*(x[rows].to(device) for x in inputs))
        return {"logits": logits.float().cpu(), "embeddings": embeddings.float().cpu(),
                "modality_embeddings": modality_embeddings.float().cpu(),
                **{name: value.float().cpu() for name, value in captured.items()}}

    return run_teacher


@dataclass(frozen=True)
class Part:
    """Rows that one worker runs the teacher on and writes as one shard of the store."""

    checkpoint: str
    store_root: str
    teacher_fingerprint: str
    layers: list[str] | None
    tensors: str
    positions: list[int]
    threads: int | None


@task(name="extract-teacher-part", description="Run the frozen teacher on one part of the rows and store a shard.",
      cache_policy=NO_CACHE, tags=["teacher"])
def extract_part(part: Part, config: RunConfig, classes: list[str]) -> int:
    """Load the teacher in this worker, compute the part's outputs and add them to the store; return the rows."""
    if part.threads is not None:
        torch.set_num_threads(part.threads)
    teacher, metadata = load_extra_teacher(Path(part.checkpoint), config, classes)
    if metadata["fingerprint"] != part.teacher_fingerprint:
        raise ConfigError(f"{part.checkpoint} changed while its outputs were being extracted; run the stage again")
    # Only the part's rows are read from the memory-mapped file, and no tensor travels through Dask.
    dataset = load_decoded(Path(part.tensors), mmap=True).take(part.positions)
    store = FeatureStore(Path(part.store_root), part.teacher_fingerprint, dtype=config.extract.dtype, layers=part.layers)
    inputs = dataset.with_modalities(teacher.modalities).model_inputs()
    run_teacher = teacher_on_rows(teacher, inputs, store.outputs, config)
    batch = config.extract.batch_size
    rows = len(part.positions)
    pieces = [run_teacher(list(range(start, min(start + batch, rows)))) for start in range(0, rows, batch)]
    store.add(dataset.keys, {name: torch.cat([piece[name] for piece in pieces]) for name in store.outputs})
    return rows


def dask_task_runner(extract: ExtractConfig):
    """Return Prefect's Dask task runner: on the scheduler at extract.cluster_address, or a local cluster.

    Raises:
        ConfigError: prefect-dask is not installed.
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            f"extract.workers = {extract.workers} needs prefect-dask: pip install 'mmkd[dask]', "
            "or set extract.workers to 1"
        ) from None
    if extract.cluster_address:
        return DaskTaskRunner(address=extract.cluster_address)
    # One single-threaded process per worker. The scheduler, the workers and the dashboard listen on loopback only.
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": extract.workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    })


def spread_missing(store: FeatureStore, checkpoint: Path, metadata: dict, dataset: TensorDataset, tensors: Path,
                   config: RunConfig) -> int:
    """Compute the rows the store lacks on extract.workers Dask workers, through Prefect's task runner; return how many.

    The rows are cut into parts of at most extract.shard_rows, at least one per worker,
    each a task that loads the teacher and writes one shard. The flow holds the store's lock
    throughout, so another extraction of the same store waits as it would for one process.
    """
    extract = config.extract
    with store.locked():
        store.refresh()
        positions = store.missing_unique(dataset.keys)
        if not positions:
            return 0
        part_rows = min(extract.shard_rows, math.ceil(len(positions) / extract.workers))
        threads = None if extract.cluster_address else max(1, (os.cpu_count() or 1) // extract.workers)
        parts = []
        for start in range(0, len(positions), part_rows):
            parts.append(Part(
                checkpoint=str(checkpoint), store_root=str(store.folder.parent), teacher_fingerprint=metadata["fingerprint"],
                layers=store.layers, tensors=str(tensors), positions=positions[start : start + part_rows], threads=threads,
            ))
        flow_logger().info("Teacher outputs: %d new rows in %d parts on %s", len(positions), len(parts),
                           extract.cluster_address or f"{extract.workers} local Dask workers")
        # Each part is a task of this flow run. The local cluster lasts as long as this block.
        with dask_task_runner(extract) as runner:
            futures = [runner.submit(extract_part, {"part": part, "config": config, "classes": dataset.classes})
                       for part in parts]
            written = sum(future.result() for future in futures)
        store.refresh()
        return written


@flow(name="extract", description="Store the frozen teacher's logits and embeddings for every row.")
def extract_flow(run_dir: str) -> dict:
    """Fill the feature store for the run's teacher and dataset."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)

    # Each store is keyed by a teacher's fingerprint and each row's decoded content.
    results = []
    for checkpoint in [paths.teacher, *(t.checkpoint for t in config.distill.extra_teachers)]:
        teacher, metadata = load_extra_teacher(checkpoint, config, dataset.classes)
        store = open_store(paths, config, metadata["fingerprint"], own_teacher=checkpoint == paths.teacher)
        store.remove_stale_temporaries()
        missing_before = len(store.missing(dataset.keys))
        if config.extract.workers > 1 or config.extract.cluster_address:
            # Workers read the rows from the decoded tensor file, which the run has just read (a cache hit).
            tensors = decode_to_cache(config.data, paths.tensor_cache)
            computed = spread_missing(store, checkpoint, metadata, dataset, tensors, config)
        else:
            computed = extract_missing(store, teacher, dataset, config)
        reused = len(dataset) - missing_before
        logger.info("Teacher outputs of %s: %d rows computed, %d reused from %s", checkpoint.name, computed, reused,
                    store.folder)
        results.append({"rows": len(dataset), "computed": computed, "reused": reused, **store.describe()})
    return {**results[0], "extra_teachers": results[1:]}


def load_extra_teacher(checkpoint: Path, config: RunConfig, classes: list[str]):
    """Load a teacher checkpoint and check that it predicts the run's classes in the same order.

    Raises:
        ConfigError: its classes differ from the dataset's.
    """
    teacher, metadata = load_checkpoint(checkpoint, config)
    if metadata["classes"] != classes:
        raise ConfigError(f"teacher {checkpoint} predicts classes {metadata['classes']}, but this run's data has "
                          f"{classes}; a teacher must share the classes and their order")
    return teacher, metadata
