"""Tune flow: an Optuna search over the student's training settings, each trial a Prefect task.

The data is validated, the teacher trained and its outputs stored once, as in the
pipeline (unchanged stages are reused). Each trial then distils a student with the
settings it draws from `tune.space` and reports the monitored validation metric after
every epoch, so the median pruner can stop a trial that trails the others. The study
lives in SQLite in the run folder: a search that was stopped continues where it was.
The best settings are written back into a config that `mmkd run` takes as it is.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from mmkd.flows._common import (
    RunPaths,
    augmenter_for,
    flow_logger,
    load_run_inputs,
    open_store,
)
from mmkd.flows.distill import student_and_objective
from mmkd.flows.pipeline import run_teacher_stages, start_run
from prefect import flow, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from mmkd.checkpoints import load_checkpoint
from mmkd.config import RunConfig, SearchRange, load_config, save_config, with_settings
from mmkd.data.loading import TensorDataset
from mmkd.errors import ConfigError
from mmkd.runs import atomic_write_json, atomic_write_text
from mmkd.training import Runtime, fit


def _optuna():
    try:
        import optuna
    except ImportError as error:
        raise ConfigError("mmkd tune needs Optuna: pip install 'mmkd[tune]'") from error
    return optuna


def suggest(trial, key: str, search: SearchRange) -> Any:
    """Draw the value of one setting for `trial`."""
    if search.choices is not None:
        return trial.suggest_categorical(key, search.choices)
    if search.integer:
        return trial.suggest_int(key, int(search.low), int(search.high), log=search.log)
    return trial.suggest_float(key, search.low, search.high, log=search.log)


@task(name="tune-trial", description="Distil a student with one trial's settings; report each epoch to the pruner.",
      cache_policy=NO_CACHE, tags=["training"])
def run_trial(trial, config: RunConfig, dataset: TensorDataset, paths: RunPaths, teacher_fingerprint: str) -> dict:
    """Train the student with the trial's settings; return its scores, or where the pruner stopped it."""
    optuna = _optuna()
    settings = {key: suggest(trial, key, search) for key, search in config.tune.space.items()}
    trial_config = with_settings(config, settings)
    runtime = Runtime.from_config(trial_config)
    store = open_store(paths, trial_config, teacher_fingerprint)
    student, objective = student_and_objective(trial_config, dataset, store, paths, runtime)
    schedule = trial_config.distill.train

    def report(record: dict) -> None:
        trial.report(record[schedule.monitor], record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {record['epoch']}: {schedule.monitor} {record[schedule.monitor]:.4f}")

    try:
        result = fit(
            student, dataset.subset("train"), dataset.subset("val"), schedule, objective,
            stage=f"trial {trial.number}", seed=trial_config.seed + 1, runtime=runtime, extra_modules=[objective],
            on_epoch=report, augmenter=augmenter_for(trial_config, student),
        )
    except optuna.TrialPruned as pruned:
        # A pruned trial is an expected outcome, so the task completes and reports it.
        return {"settings": settings, "pruned": str(pruned)}
    return {"settings": settings, "pruned": None, "value": result.best_value, "best_epoch": result.best_epoch,
            "val_accuracy": result.best_val_accuracy, "epochs_run": result.epochs_run}


@flow(name="tune", description="Search the student's training settings with Optuna; write the best config.")
def tune_flow(config_path: str, out_dir: str, trials: int | None = None, resume: bool = True) -> dict:
    """Run the config's search and write best.yaml, trials.csv and tune.json in the run folder.

    Args:
        config_path: The YAML run config, with a `tune` section.
        out_dir: Folder that receives the run folder and the shared caches.
        trials: Replaces tune.trials.
        resume: Continue a stopped search of the same config; False starts a new one.

    Returns:
        The best trial's number, value and settings, and the paths written.
    """
    optuna = _optuna()
    logger = flow_logger()
    config = load_config(config_path)
    if not config.tune.space:
        raise ConfigError(f"{config_path}: tune.space is empty; name the settings to search, e.g. "
                          "distill.train.lr: {low: 0.0003, high: 0.01, log: true}")
    target_trials = trials or config.tune.trials
    run = start_run(config, Path(out_dir), kind="tune", reuse=True, resume=resume)
    with tags("mmkd"):
        run_teacher_stages(run)

    paths, run_config, dataset = load_run_inputs(str(run.run_dir))
    _, teacher = load_checkpoint(paths.teacher, run_config)
    monitor = run_config.distill.train.monitor
    study = optuna.create_study(
        study_name=f"{config.name}-seed{config.seed}", storage=f"sqlite:///{run.run_dir / 'optuna.db'}",
        load_if_exists=True, direction="minimize" if monitor == "val_loss" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=config.tune.startup_trials,
                                           n_warmup_steps=config.tune.warmup_epochs),
    )
    done = len([t for t in study.trials if t.state.is_finished()])
    if done:
        logger.info("Continuing the search in %s: %d of %d trials done", run.run_dir, done, target_trials)
    with tags("mmkd"):
        for _ in range(done, target_trials):
            trial = study.ask()
            outcome = run_trial(trial, run_config, dataset, paths, teacher["fingerprint"])
            if outcome["pruned"]:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                logger.info("Trial %d pruned at %s with %s", trial.number, outcome["pruned"], outcome["settings"])
                continue
            study.tell(trial, outcome["value"])
            logger.info("Trial %d: %s %.4f with %s", trial.number, monitor, outcome["value"], outcome["settings"])

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise RuntimeError(f"no trial of the search in {run.run_dir} finished, all were pruned; raise "
                           "tune.startup_trials or tune.warmup_epochs")
    best = study.best_trial
    # The original config (its manifest, not validation's copy) with the best settings.
    best_config = with_settings(config, best.params)
    save_config(best_config, run.run_dir / "best.yaml")
    _write_trials(study, run.run_dir / "trials.csv", monitor)
    summary = {"best_trial": best.number, "monitor": monitor, "best_value": best.value, "best_settings": best.params,
               "trials": len(study.trials), "completed": len(completed),
               "pruned": len([t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]),
               "best_config": str(run.run_dir / "best.yaml"), "study": str(run.run_dir / "optuna.db"),
               "run_dir": str(run.run_dir)}
    atomic_write_json(run.run_dir / "tune.json", summary)
    logger.info("Best trial %d: %s %.4f with %s; config %s", best.number, monitor, best.value, best.params,
                run.run_dir / "best.yaml")
    _publish(study, summary, monitor)
    return summary


def _write_trials(study, path: Path, monitor: str) -> None:
    keys = sorted({key for t in study.trials for key in t.params})
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["trial", "state", monitor, "epochs_reported", *keys])
    for t in study.trials:
        writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.6f}",
                         len(t.intermediate_values), *[t.params.get(k, "") for k in keys]])
    atomic_write_text(path, text.getvalue())


def _publish(study, summary: dict, monitor: str) -> None:
    """Show the trials as a Prefect table artifact."""
    if FlowRunContext.get() is None:
        return
    from prefect.artifacts import create_table_artifact

    table = [{"trial": t.number, "state": t.state.name.lower(), monitor: t.value, **t.params} for t in study.trials]
    create_table_artifact(key="tune-trials", table=table,
                          description=f"Trials of the search; best is trial {summary['best_trial']} "
                                      f"({monitor} {summary['best_value']:.4f}), config {summary['best_config']}")
