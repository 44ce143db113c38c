"""Evaluate flow: test metrics of teacher, distilled student and a label-only baseline."""

from __future__ import annotations

from mmkd.flows._common import EpochProgress, RunPaths, augmenter_for, flow_logger, load_run_inputs, seed_everything
from mmkd.flows.distill import STUDENT_SEED_OFFSET
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mmkd.checkpoints import build_model, load_checkpoint, save_checkpoint
from mmkd.config import RunConfig, TrainConfig
from mmkd.data.loading import TensorDataset
from mmkd.training import Runtime, classification_metrics, fit, predict, supervised_loss


def baseline_budget(config: RunConfig) -> TrainConfig:
    """The baseline gets the student's whole budget: distillation plus finetuning epochs."""
    return config.distill.train.model_copy(
        update={"epochs": config.distill.train.epochs + config.finetune.train.epochs}
    )


@task(name="train-baseline", description="Train the label-only baseline; never retried.",
      cache_policy=NO_CACHE, tags=["training"])
def train_baseline(config: RunConfig, dataset: TensorDataset, paths: RunPaths) -> dict:
    """Train the student architecture on labels only, from the student's initial weights."""
    seed_everything(config.seed + STUDENT_SEED_OFFSET)
    runtime = Runtime.from_config(config)
    baseline = build_model(config, "baseline", dataset.classes).to(runtime.device)
    progress = EpochProgress("baseline", baseline_budget(config).epochs, tensorboard=paths.tensorboard(config))
    state = paths.training_state("baseline", config)
    schedule = baseline_budget(config)
    result = fit(
        baseline, dataset.subset("train"), dataset.subset("val"), schedule, supervised_loss(schedule.label_smoothing),
        stage="baseline", on_epoch=progress, seed=config.seed + 1, runtime=runtime, state=state,
        augmenter=augmenter_for(config, baseline),
    )
    progress.finish(result.epochs_run)
    saved = save_checkpoint(paths.baseline, baseline.cpu(), config, "baseline", dataset.classes, training=result.summary())
    state.discard()
    return saved


@flow(name="evaluate", description="Test-split accuracy, macro-F1 and per-class scores of teacher, student and baseline.")
def evaluate_flow(run_dir: str) -> dict:
    """Train the baseline if the run has none, then score the three models on the test split."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)
    if not paths.baseline.exists():
        train_baseline(config, dataset, paths)

    # Every model is scored on the same test rows.
    test = dataset.subset("test")
    results = {}
    for role, path in (("teacher", paths.teacher), ("student", paths.student), ("baseline", paths.baseline)):
        model, metadata = load_checkpoint(path, config)
        metrics = classification_metrics(predict(model, test)[0], test.labels, dataset.classes)
        results[role] = {"params": metadata["params"], "test": metrics, "training": metadata.get("training")}
        logger.info(
            "%s: %d parameters, test accuracy %.4f, macro-F1 %.4f",
            role, metadata["params"], metrics["accuracy"], metrics["macro_f1"],
        )
    return results
