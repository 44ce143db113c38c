"""Finetune flow: supervised finetuning of the distilled student on labels."""

from __future__ import annotations

from mmkd.flows._common import EpochProgress, augmenter_for, flow_logger, load_run_inputs
from prefect import flow

from mmkd.checkpoints import load_checkpoint, save_checkpoint
from mmkd.training import Runtime, fit, predict, supervised_loss


@flow(name="finetune", description="Finetune the distilled student on labels, early-stopped on validation.")
def finetune_flow(run_dir: str) -> dict:
    """Produce student.pt: the finetuned student, or the distilled one if finetuning did not help."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)
    train, val = dataset.subset("train"), dataset.subset("val")

    # Validation accuracy before finetuning is the bar finetuning has to beat.
    student, metadata = load_checkpoint(paths.distilled, config)
    before = float((predict(student, val)[0].argmax(1) == val.labels).float().mean())
    initial_state = {k: v.clone() for k, v in student.state_dict().items()}

    runtime = Runtime.from_config(config)
    progress = EpochProgress("finetune", config.finetune.train.epochs, tensorboard=paths.tensorboard(config))
    state = paths.training_state("finetune", config)
    schedule = config.finetune.train
    result = fit(
        student.to(runtime.device), train, val, schedule, supervised_loss(schedule.label_smoothing),
        stage="finetune", on_epoch=progress, seed=config.seed + 2, runtime=runtime, state=state,
        augmenter=augmenter_for(config, student),
    )
    progress.finish(result.epochs_run)
    kept = result.best_val_accuracy > before
    if not kept:
        student.load_state_dict(initial_state)
        logger.info("Finetuning did not beat val accuracy %.4f; keeping the distilled weights", before)
    training = {
        "distill": metadata.get("training"),
        "finetune": {**result.summary(), "val_accuracy_before": before, "kept": kept},
    }
    saved = save_checkpoint(paths.student, student.cpu(), config, "student", dataset.classes, training=training)
    state.discard()
    return {"params": saved["params"], "training": training}
