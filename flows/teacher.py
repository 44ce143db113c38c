"""Teacher flow: train the multimodal teacher, or take a checkpoint trained before."""

from __future__ import annotations

import shutil

from mmkd.flows._common import EpochProgress, RunPaths, augmenter_for, flow_logger, load_run_inputs, seed_everything
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import build_model, load_checkpoint, save_checkpoint
from mmkd.config import RunConfig
from mmkd.data.loading import TensorDataset
from mmkd.training import Runtime, classification_metrics, fit, predict, supervised_loss


@task(name="train-teacher", description="Train the teacher; a failed epoch fails the run, never retried.",
      cache_policy=NO_CACHE, tags=["training"])
def train_teacher(config: RunConfig, dataset: TensorDataset, paths: RunPaths) -> dict:
    """Train the teacher on the train split, early-stopped on validation accuracy."""
    seed_everything(config.seed)
    runtime = Runtime.from_config(config)
    model = build_model(config, "teacher", dataset.classes).to(runtime.device)
    progress = EpochProgress("teacher", config.teacher.train.epochs, tensorboard=paths.tensorboard(config))
    state = paths.training_state("teacher", config)
    schedule = config.teacher.train
    result = fit(
        model, dataset.subset("train"), dataset.subset("val"), schedule, supervised_loss(schedule.label_smoothing),
        stage="teacher", on_epoch=progress, seed=config.seed, runtime=runtime, state=state,
        augmenter=augmenter_for(config, model),
    )
    progress.finish(result.epochs_run)
    saved = save_checkpoint(paths.teacher, model.cpu(), config, "teacher", dataset.classes, training=result.summary())
    state.discard()
    return saved


@flow(name="teacher", description="Train the multimodal teacher (or reuse a checkpoint) and save teacher.pt.")
def teacher_flow(run_dir: str) -> dict:
    """Produce the run's teacher.pt and report its size and validation accuracy."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)

    # A teacher trained earlier is copied into the run, so the run folder is complete.
    if config.teacher.checkpoint is not None:
        shutil.copyfile(config.teacher.checkpoint, paths.teacher)
        logger.info("Using the teacher checkpoint %s", config.teacher.checkpoint)
    else:
        train_teacher(config, dataset, paths)

    # Report the teacher's validation accuracy from the saved weights.
    model, metadata = load_checkpoint(paths.teacher, config)
    if metadata["classes"] != dataset.classes:
        raise ValueError(
            f"teacher {paths.teacher} predicts classes {metadata['classes']}, but the data has "
            f"{dataset.classes}; train a new teacher or set data.classes to match"
        )
    val = dataset.subset("val")
    val_metrics = classification_metrics(predict(model, val)[0], val.labels, dataset.classes)
    logger.info("Teacher: %d parameters, val accuracy %.4f", metadata["params"], val_metrics["accuracy"])
    return {"params": metadata["params"], "fingerprint": metadata["fingerprint"], "val": val_metrics,
            "training": metadata.get("training")}
