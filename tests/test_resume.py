"""Training that survives a kill: the saved state, resuming from it, and refusing a foreign one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from test_training_controls import image_rows

from mmkd.config import AudioConfig, ImageConfig, ModelConfig, TrainConfig
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.train_state import StateMismatchError, TrainingState
from mmkd.training import Runtime, cross_entropy_loss, fit

WORKER = Path(__file__).with_name("resume_worker.py")


def small_model() -> MultimodalClassifier:
    torch.manual_seed(0)
    return MultimodalClassifier(ModelConfig(image_encoder={"width": 4, "blocks": [1]}, embed_dim=8, dropout=0.3),
                                modalities=["image"], num_classes=3, image=ImageConfig(), audio=AudioConfig())


def train(schedule: TrainConfig, state: TrainingState | None, loss_fn=cross_entropy_loss):
    model = small_model()
    result = fit(model, image_rows(64, 1), image_rows(16, 2), schedule, loss_fn, stage="test", seed=0,
                 runtime=Runtime(), state=state)
    return model, result


def interrupting(after_calls: int):
    """A loss that raises on its `after_calls`-th call, as a crash in the middle of an epoch would."""
    calls = {"count": 0}

    def loss_fn(outputs, batch):
        calls["count"] += 1
        if calls["count"] == after_calls:
            raise KeyboardInterrupt
        return cross_entropy_loss(outputs, batch)

    return loss_fn


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine", "constant"])
@pytest.mark.parametrize("crash_at", [3, 8, 13, 20])
def test_crash_resume_matches_uninterrupted(tmp_path, schedule, crash_at):
    # 8 steps per epoch: crashes land mid-epoch (3, 13, 20) and on an epoch's first step (8 +1).
    config = TrainConfig(epochs=3, batch_size=8, lr=0.01, patience=3, schedule=schedule, ema_decay=0.9,
                         grad_clip_norm=1.0, checkpoint_every_steps=1)
    reference, reference_result = train(config, None)
    state = TrainingState(tmp_path, stage="test", config_hash="a")
    with pytest.raises(KeyboardInterrupt):
        train(config, state, interrupting(crash_at))
    resumed, result = train(config, state)
    assert result.resumed == 1
    assert same_weights(reference.state_dict(), resumed.state_dict())
    assert [r["loss"] for r in result.history] == [r["loss"] for r in reference_result.history]


def test_sparse_saves_repeat_later_steps(tmp_path):
    # Saved after steps 5, 8 (epoch end) and 10: a crash in step 13 resumes after step 10.
    config = TrainConfig(epochs=2, batch_size=8, lr=0.01, patience=2, checkpoint_every_steps=5)
    reference, _ = train(config, None)
    state = TrainingState(tmp_path, stage="test", config_hash="a")
    with pytest.raises(KeyboardInterrupt):
        train(config, state, interrupting(13))
    saved = state.load()
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (2, 2, 10)
    resumed, _ = train(config, state)
    assert same_weights(reference.state_dict(), resumed.state_dict())


def test_early_stopped_stage_stays_stopped(tmp_path):
    config = TrainConfig(epochs=30, batch_size=64, lr=1e-9, patience=1, checkpoint_every_steps=1000)
    state = TrainingState(tmp_path, stage="test", config_hash="a")
    first, result = train(config, state)
    assert result.epochs_run == 2  # one epoch, then one without improvement
    again, second_result = train(config, state)
    assert second_result.epochs_run == 2
    assert second_result.resumed == 1
    assert same_weights(first.state_dict(), again.state_dict())


def test_foreign_state_rejected(tmp_path):
    config = TrainConfig(epochs=1, batch_size=32, patience=1)
    train(config, TrainingState(tmp_path, stage="test", config_hash="a" * 64))
    with pytest.raises(StateMismatchError, match=r"fingerprint aaaaaaaaaaaa.*bbbbbbbbbbbb.*delete the file"):
        train(config, TrainingState(tmp_path, stage="test", config_hash="b" * 64))
    with pytest.raises(StateMismatchError, match="not a distill training state"):
        TrainingState(tmp_path, stage="distill", config_hash="a" * 64).load()


class NotAllowed:
    """A class a weights-only load must not construct."""


def test_state_with_objects_not_loaded(tmp_path):
    state = TrainingState(tmp_path, stage="test", config_hash="a")
    torch.save({"format": "mmkd-training-state/1", "stage": "test", "config_hash": "a", "payload": NotAllowed()},
               state.path)
    with pytest.raises(StateMismatchError, match="cannot be read as a training state"):
        state.load()


def test_repeated_sigkills_keep_the_result(tmp_path):
    """Acceptance: at least five kills at random moments; every resume continues; same final weights."""
    reference_out = tmp_path / "reference.pt"
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "reference-state"), str(reference_out)],
                   check=True, capture_output=True, timeout=300)

    state_dir, out = tmp_path / "state", tmp_path / "killed.pt"
    chooser = random.Random()  # not seeded: each test run kills at new moments
    steps_at_kills, delays = [0], []
    while True:
        process = subprocess.Popen([sys.executable, str(WORKER), str(state_dir), str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout.readline().strip() == "training"
        # Kill until six kills have landed after some progress, then let the run finish.
        if sum(b > a for a, b in pairwise(steps_at_kills)) < 6 and len(delays) < 30:
            delays.append(chooser.uniform(0.2, 1.5))
            time.sleep(delays[-1])
            process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=300) in (0, -signal.SIGKILL)
        if process.returncode == 0:
            break
        # Whatever the moment of the kill, the state on disk is complete and readable.
        saved = TrainingState(state_dir, stage="distill", config_hash="resume-worker").load()
        steps_at_kills.append(0 if saved is None else saved["global_step"])
        if saved is not None:
            assert len(saved["modules"]) == 2
            assert saved["global_step"] >= steps_at_kills[-2]
    resumed_kills = sum(b > a for a, b in pairwise(steps_at_kills))
    print(f"killed at global steps {steps_at_kills[1:]} after {[round(d, 2) for d in delays]} s")
    assert resumed_kills >= 5, f"only {resumed_kills} kills landed after progress (steps {steps_at_kills}, delays {delays})"

    reference, killed = torch.load(reference_out, weights_only=True), torch.load(out, weights_only=True)
    assert killed["resumed"] >= resumed_kills
    assert same_weights(reference["student"], killed["student"])
    assert same_weights(reference["objective"], killed["objective"])
    assert [r["loss"] for r in killed["history"]] == [r["loss"] for r in reference["history"]]
    assert not list(state_dir.glob(".*.tmp"))


def test_unfinished_run_lookup(tmp_path):
    from mmkd.runs import atomic_write_json, unfinished_run

    for name, fingerprint, finished in [("20261201T000000Z-a", "same", False), ("20261202T000000Z-a", "same", False),
                                        ("20261203T000000Z-a", "same", True), ("20261204T000000Z-a", "other", False)]:
        atomic_write_json(tmp_path / name / "run.json", {"config_fingerprint": fingerprint})
        if finished:
            atomic_write_json(tmp_path / name / "metrics.json", {})
    assert unfinished_run(tmp_path, "same") == tmp_path / "20261202T000000Z-a"
    assert unfinished_run(tmp_path, "other") == tmp_path / "20261204T000000Z-a"
    assert unfinished_run(tmp_path, "new") is None


def test_killed_mmkd_run_resumes(tmp_path, small_avdigits, prefect_server):
    from conftest import write_config
    from mmkd.flows.pipeline import pipeline_flow
    from prefect.settings import PREFECT_API_URL

    config = write_config(tmp_path / "configs", small_avdigits, promotion={"enabled": False},
                          distill={"train": {"epochs": 40, "batch_size": 8, "patience": 40, "checkpoint_every_steps": 1}})
    out = tmp_path / "runs"
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    process = subprocess.Popen([str(Path(sys.executable).with_name("mmkd")), "run", str(config), "--out", str(out)],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed once the distill stage has saved its state, in the middle of its 40 epochs.
    deadline = time.monotonic() + 600
    while not list(out.glob("*/checkpoints/distill/state.pt")):
        assert process.poll() is None, "mmkd run ended before the distill stage saved its state"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.uniform(0.2, 1.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    (killed_run,) = [p.parent for p in out.glob("*/run.json")]
    assert not (killed_run / "metrics.json").exists()

    result = pipeline_flow(str(config), str(out))
    assert Path(result["run_dir"]) == killed_run
    assert [p.parent for p in out.glob("*/run.json") if not p.parent.is_symlink()] == [killed_run]
    distill = result["student"]["training"]["distill"]
    assert distill["resumed"] == 1
    assert distill["epochs_run"] == 40
    assert set(result["reused"]) >= {"validate", "teacher"}
    assert not (killed_run / "checkpoints" / "distill").exists()
