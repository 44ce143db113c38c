"""Distill flow: train the small student against the stored teacher outputs."""

from __future__ import annotations

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import build_model, load_checkpoint, save_checkpoint
from mmkd.config import RunConfig
from mmkd.data.loading import TensorDataset
from mmkd.distillation import DistillationObjective
from mmkd.features import FeatureStore, layer_output
from mmkd.flows._common import EpochProgress, RunPaths, flow_logger, load_run_inputs, open_store, seed_everything
from mmkd.training import fit, resolve_device

STUDENT_SEED_OFFSET = 1000  # the student and the baseline start from the same weights


@task(name="distill-student", description="Train the student on the distillation objective; never retried.",
      cache_policy=NO_CACHE, tags=["training"])
def distill_student(config: RunConfig, dataset: TensorDataset, store: FeatureStore, paths: RunPaths) -> dict:
    """Train the student on the weighted sum of the configured loss terms."""
    train, val = dataset.subset("train"), dataset.subset("val")
    stored = store.get_outputs(train.keys)
    teacher_embeddings = stored["embeddings"]
    teacher_logits = combined_logits(stored["logits"], config, paths, train.keys)
    seed_everything(config.seed + STUDENT_SEED_OFFSET)
    device = resolve_device(config.device)
    student = build_model(config, "student", dataset.classes).to(device)
    objective = DistillationObjective(
        config.distill.losses,
        student_dim=student.embedding_dim,
        teacher_dim=teacher_embeddings.shape[1],
        teacher_logits=teacher_logits,
        teacher_embeddings=teacher_embeddings,
        alignment=config.distill.alignment,
        student=student,
        teacher_targets=feature_targets(stored, config),
    ).to(device)
    progress = EpochProgress("distill", config.distill.train.epochs)
    result = fit(
        student, train, val, config.distill.train, objective,
        stage="distill", on_epoch=progress, seed=config.seed + 1, device=device, extra_modules=[objective],
    )
    progress.finish(result.epochs_run)
    training = {**result.summary(), "loss_terms": objective.names}
    return save_checkpoint(paths.distilled, student.cpu(), config, "student", dataset.classes, training=training)


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
def distill_flow(run_dir: str) -> dict:
    """Produce student_distilled.pt from the run's teacher outputs."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)

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
