"""Finetune flow: supervised finetuning of the distilled student on labels."""

from __future__ import annotations

from prefect import flow

from mmkd.checkpoints import load_checkpoint, save_checkpoint
from mmkd.flows._common import EpochProgress, flow_logger, load_run_inputs
from mmkd.training import cross_entropy_loss, fit, predict, resolve_device


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

    device = resolve_device(config.device)
    progress = EpochProgress("finetune", config.finetune.train.epochs)
    result = fit(
        student.to(device), train, val, config.finetune.train, cross_entropy_loss,
        stage="finetune", on_epoch=progress, seed=config.seed + 2, device=device,
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
    return {"params": saved["params"], "training": training}
