"""Extract flow: run the frozen teacher once per row and keep its outputs in the feature store."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import load_checkpoint
from mmkd.config import RunConfig
from mmkd.data.loading import TensorDataset
from mmkd.errors import ConfigError
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

    captured = capture_layers(teacher, [name for name in store.outputs if name.startswith("layer-")])

    @torch.no_grad()
    def run_teacher(positions: list[int]) -> Outputs:
        rows = torch.as_tensor(positions)
        logits, embeddings, modality_embeddings = teacher.forward_with_modalities(*(x[rows].to(device) for x in inputs))
        return {"logits": logits.float().cpu(), "embeddings": embeddings.float().cpu(),
                "modality_embeddings": modality_embeddings.float().cpu(),
                **{name: value.float().cpu() for name, value in captured.items()}}

    return extract(
        store, run_teacher, dataset.keys, shard_rows=config.extract.shard_rows, batch_rows=config.extract.batch_size,
        on_shard=lambda done, total: logger.info("Teacher outputs: %d of %d new rows stored", done, total),
    )


def average_positions(output: torch.Tensor | tuple) -> torch.Tensor:
    """Reduce a layer's output to (rows, width).

    4-D outputs (convolution maps) are averaged over their last two axes, 3-D outputs
    (token or frame sequences) over their second axis; 2-D outputs are kept. A tuple, as
    transformers blocks return, gives its first element.
    """
    x = output[0] if isinstance(output, tuple) else output
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x


def capture_layers(teacher: torch.nn.Module, outputs: list[str]) -> dict[str, torch.Tensor]:
    """Hook the teacher modules behind store outputs `outputs`; return the dict each forward pass fills.

    Raises:
        ConfigError: a module does not exist; the message lists the teacher's module names.
    """
    modules = dict(teacher.named_modules())
    captured: dict[str, torch.Tensor] = {}
    for output in outputs:
        name = output.removeprefix("layer-")
        if name not in modules:
            known = [n for n in modules if n and n.count(".") <= 3]
            raise ConfigError(f"extract.layers: the teacher has no module {name!r}; some of its modules: "
                              f"{', '.join(known[:40])}")

        def keep(_module, _inputs, result, output=output) -> None:
            captured[output] = average_positions(result)

        modules[name].register_forward_hook(keep)
    return captured


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
