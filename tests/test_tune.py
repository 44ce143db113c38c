"""Hyperparameter search: the search space in the config, and the tune flow with Optuna and the median pruner."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import optuna
import pytest
from prefect import get_client

from mmkd.config import config_from_dict, load_config, with_settings
from mmkd.errors import ConfigError
from mmkd.flows.tune import tune_flow

from conftest import write_config

SPACE = {
    "distill.train.lr": {"low": 1e-6, "high": 0.05, "log": True},
    "distill.losses.0.params.temperature": {"choices": [2.0, 4.0, 8.0]},
    "student.dropout": {"low": 0.0, "high": 0.4},
}


def raw(**tune) -> dict:
    return {"data": {"manifest": "m.csv"}, "tune": tune}


def test_search_key_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'distill.train.lrr': distill.train has no 'lrr'; it has .*lr"):
        config_from_dict(raw(space={"distill.train.lrr": {"low": 0.1, "high": 1}}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"'teacher.dropout' is outside the sections a trial trains"):
        config_from_dict(raw(space={"teacher.dropout": {"low": 0.1, "high": 0.2}}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"distill.losses is a list of 2 items"):
        config_from_dict(raw(space={"distill.losses.5.weight": {"low": 0.1, "high": 1}}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="give either choices, or low and high"):
        config_from_dict(raw(space={"distill.train.lr": {"low": 0.1}}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="a log range needs low above 0"):
        config_from_dict(raw(space={"distill.train.lr": {"low": 0, "high": 1, "log": True}}), base_dir=tmp_path)


def test_settings_by_dotted_key(tmp_path):
    config = config_from_dict(raw(space=SPACE), base_dir=tmp_path)
    changed = with_settings(config, {"distill.train.lr": 0.004, "distill.losses.0.params.temperature": 8.0,
                                     "student.dropout": 0.25})
    assert changed.distill.train.lr == 0.004
    assert changed.distill.losses[0].params["temperature"] == 8.0
    assert changed.student.dropout == 0.25
    assert changed.distill.losses[1] == config.distill.losses[1]
    with pytest.raises(ConfigError, match=r"distill.train.lr"):
        with_settings(config, {"distill.train.lr": -1})


def test_tune_flow_median_pruning(tmp_path, small_avdigits, prefect_server):
    config = write_config(
        tmp_path / "configs", small_avdigits, promotion={"enabled": False},
        distill={"train": {"epochs": 4, "batch_size": 16, "patience": 4, "monitor": "val_loss"}},
        tune={"trials": 6, "space": SPACE, "startup_trials": 2, "warmup_epochs": 0},
    )
    result = tune_flow(str(config), str(tmp_path / "runs"))
    run_dir = Path(result["run_dir"])
    study = optuna.load_study(study_name="tiny-seed0", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    trials = study.trials
    assert len(trials) == result["trials"] == 6

    # Each pruned trial's last value is worse (a higher loss) than the median of the trials finished before it.
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    for trial in trials:
        earlier = [t for t in completed if t.number < trial.number]
        for step, value in trial.intermediate_values.items():
            others = [t.intermediate_values[step] for t in earlier if step in t.intermediate_values]
            pruned_here = trial.state == optuna.trial.TrialState.PRUNED and step == max(trial.intermediate_values)
            if len(earlier) < 2 or not others:
                assert not pruned_here
            elif pruned_here:
                assert value > statistics.median(others)
            else:
                assert value <= statistics.median(others)
    assert result["pruned"] == len([t for t in trials if t.state == optuna.trial.TrialState.PRUNED])

    # The best trial is the lowest validation loss, and its settings are in a config `mmkd run` reads.
    assert result["best_value"] == min(t.value for t in completed)
    best = load_config(result["best_config"])
    assert best.distill.train.lr == study.best_params["distill.train.lr"]
    assert best.distill.losses[0].params["temperature"] == study.best_params["distill.losses.0.params.temperature"]
    assert best.student.dropout == study.best_params["student.dropout"]
    assert best.data.manifest == small_avdigits.resolve()
    with open(run_dir / "trials.csv", newline="") as stream:
        assert len(list(csv.DictReader(stream))) == 6
    assert json.loads((run_dir / "tune.json").read_text())["best_trial"] == study.best_trial.number

    # Each trial ran as a Prefect task run of the tune flow.
    with get_client(sync_client=True) as client:
        flow_run_id = next(run.id for run in client.read_flow_runs() if run.parameters.get("config_path") == str(config)
                           and run.parameters.get("out_dir") == str(tmp_path / "runs"))
        names = [t.name for t in client.read_task_runs() if t.flow_run_id == flow_run_id]
    assert len([n for n in names if n.startswith("tune-trial")]) == 6


def test_stopped_search_continues(tmp_path, small_avdigits, prefect_server):
    config = write_config(
        tmp_path / "configs", small_avdigits, promotion={"enabled": False},
        distill={"train": {"epochs": 1, "batch_size": 32, "patience": 1}},
        tune={"trials": 2, "space": {"distill.train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
    )
    first = tune_flow(str(config), str(tmp_path / "runs"))
    (Path(first["run_dir"]) / "tune.json").unlink()  # as if the search was killed after its second trial
    again = tune_flow(str(config), str(tmp_path / "runs"), trials=3)
    assert again["run_dir"] == first["run_dir"]
    assert again["trials"] == 3
