"""Distill flow: train the small student against the stored teacher outputs."""

from __future__ import annotations

import torch
from mmkd.flows._common import (
    EpochProgress,
    RunPaths,
    augmenter_for,
    flow_logger,
    load_run_inputs,
    open_store,
    seed_everything,
)
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import build_model, load_checkpoint, save_checkpoint
from mmkd.config import RunConfig
from mmkd.data.loading import TensorDataset
from mmkd.distillation import DistillationObjective
from mmkd.distributed import (
    distributed_backend,
    is_main_process,
    launch_distributed,
    world_size,
)
from mmkd.features import FeatureStore, layer_output
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.training import Runtime, fit

STUDENT_SEED_OFFSET = 1000  # the student and the baseline start from the same weights


@task(name="distill-student", description="Train the student on the distillation objective; never retried.",
      cache_policy=NO_CACHE, tags=["training"])
def distill_student(config: RunConfig, dataset: TensorDataset, store: FeatureStore, paths: RunPaths) -> dict:
    """Train the student in this process, or in `distill.nproc` processes started by torchrun."""
    if config.distill.nproc > 1:
        launch_distributed(paths.run_dir, config.distill.nproc, backend=distributed_backend(config))
        return load_checkpoint(paths.distilled, config)[1]
    return train_student(config, dataset, store, paths)


def student_and_objective(config: RunConfig, dataset: TensorDataset, store: FeatureStore, paths: RunPaths,
                          runtime: Runtime) -> tuple[MultimodalClassifier, DistillationObjective]:
    """Build the untrained student and its objective over the stored teacher outputs of the training rows."""
    train_keys = dataset.subset("train").keys
    stored = store.get_outputs(train_keys)
    teacher_embeddings = stored["embeddings"]
    teacher_logits = combined_logits(stored["logits"], config, paths, train_keys)
    seed_everything(config.seed + STUDENT_SEED_OFFSET)
    student = build_model(config, "student", dataset.classes).to(runtime.device)
    objective = DistillationObjective(
        config.distill.losses,
        student_dim=student.embedding_dim,
        teacher_dim=teacher_embeddings.shape[1],
        teacher_logits=teacher_logits,
        teacher_embeddings=teacher_embeddings,
        alignment=config.distill.alignment,
        student=student,
        teacher_targets=feature_targets(stored, config),
    ).to(runtime.device)
    return student, objective


def train_student(config: RunConfig, dataset: TensorDataset, store: FeatureStore, paths: RunPaths) -> dict:
    """Train the student on the weighted sum of the configured loss terms and save student_distilled.pt.

    Under torchrun every process calls this; only the first one writes files.
    """
    runtime = Runtime.from_config(config)
    student, objective = student_and_objective(config, dataset, store, paths, runtime)
    progress = EpochProgress("distill", config.distill.train.epochs, tensorboard=paths.tensorboard(config))
    state = paths.training_state("distill", config)
    result = fit(
        student, dataset.subset("train"), dataset.subset("val"), config.distill.train, objective, stage="distill",
        on_epoch=progress, seed=config.seed + 1, runtime=runtime, extra_modules=[objective], state=state,
        augmenter=augmenter_for(config, student),
    )
    progress.finish(result.epochs_run)
    training = {**result.summary(), "loss_terms": objective.names, "processes": world_size()}
    if not is_main_process():
        return {}
    saved = save_checkpoint(paths.distilled, student.cpu(), config, "student", dataset.classes, training=training)
    state.discard()
    return saved


def feature_targets(stored: dict[str, torch.Tensor], config: RunConfig) -> dict[str, torch.Tensor]:
    """Name the stored teacher features a loss term may compare with: each modality's embedding and each stored layer."""
    targets = {m: stored["modality_embeddings"][:, i] for i, m in enumerate(config.data.modalities)}
    targets.update({f"layer:{name}": stored[layer_output(name)] for name in config.extract.layers})
    return targets


def combined_logits(own: torch.Tensor, config: RunConfig, paths: RunPaths, keys: list[str]) -> torch.Tensor:
    """Return the weighted average of the run's teacher's logits and every extra teacher's, for rows `keys`."""
    if not config.distill.extra_teachers:
        return own
    total = own * config.distill.teacher_weight
    for extra in config.distill.extra_teachers:
        _, metadata = load_checkpoint(extra.checkpoint, config)
        store = open_store(paths, config, metadata["fingerprint"], own_teacher=False)
        total = total + store.get(keys)[0] * extra.weight
    return total / (config.distill.teacher_weight + sum(t.weight for t in config.distill.extra_teachers))


@flow(name="distill", description="Train the student against cached teacher logits and features.")
def distill_flow(run_dir: str, nproc: int | None = None) -> dict:
    """Produce student_distilled.pt from the run's teacher outputs.

    Args:
        run_dir: The run folder, with its teacher and feature store.
        nproc: Train in this many processes (torchrun); replaces the config's distill.nproc.
    """
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)
    if nproc is not None:
        config = config.model_copy(update={"distill": config.distill.model_copy(update={"nproc": nproc})})

    # Teacher outputs come from the feature store; the teacher itself is not run again.
    _, teacher_metadata = load_checkpoint(paths.teacher, config)
    store = open_store(paths, config, teacher_metadata["fingerprint"])
    metadata = distill_student(config, dataset, store, paths)

    logger.info(
        "Distilled student: %d parameters (teacher %d, %.1fx fewer), val accuracy %.4f",
        metadata["params"], teacher_metadata["params"], teacher_metadata["params"] / metadata["params"],
        metadata["training"]["best_val_accuracy"],
    )
    return {"params": metadata["params"], "training": metadata["training"]}
