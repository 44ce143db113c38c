"""Several teachers: an audio-only teacher from an earlier run joins the audio-visual teacher's targets."""

from __future__ import annotations

import pytest
import torch

from mmkd.checkpoints import load_checkpoint
from mmkd.config import load_config, save_config
from mmkd.data.loading import load_dataset
from mmkd.flows._common import RunPaths
from mmkd.flows.distill import combined_logits, distill_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.training import predict

from conftest import write_config


def prepared_run(root, manifest, name, **changes):
    config = load_config(write_config(root / f"{name}-config", manifest, **changes))
    folder = root / name
    folder.mkdir()
    save_config(config, folder / "config.yaml")
    return folder, config


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, small_avdigits, prefect_server):
    """An audio-only teacher's run, and a run whose own teacher reads both and counts the first three times."""
    root = tmp_path_factory.mktemp("teachers")
    audio_run, _ = prepared_run(root, small_avdigits, "audio", data={"manifest": str(small_avdigits),
                                                                      "modalities": ["audio"]})
    teacher_flow.fn(str(audio_run))
    folder, config = prepared_run(
        root, small_avdigits, "both",
        distill={"extra_teachers": [{"checkpoint": str(audio_run / "teacher.pt"), "weight": 3.0}], "teacher_weight": 1.0},
    )
    teacher_flow.fn(str(folder))
    return folder, config, audio_run, extract_flow.fn(str(folder))


def test_every_teacher_is_extracted(two_teachers):
    _, _, _, extracted = two_teachers
    assert extracted["computed"] == 120
    assert [t["computed"] for t in extracted["extra_teachers"]] == [120]
    assert extracted["folder"] != extracted["extra_teachers"][0]["folder"]


def test_targets_are_weighted_average(two_teachers):
    folder, config, audio_run, _ = two_teachers
    dataset = load_dataset(config.data)
    own, _ = load_checkpoint(folder / "teacher.pt", config)
    audio_only, _ = load_checkpoint(audio_run / "teacher.pt", config)
    assert audio_only.modalities == ["audio"]
    expected = (predict(own, dataset)[0] * 1.0 + predict(audio_only, dataset)[0] * 3.0) / 4.0
    got = combined_logits(predict(own, dataset)[0], config, RunPaths(folder), dataset.keys)
    assert torch.allclose(got, expected, atol=1e-5)


def test_distillation_runs_with_two_teachers(two_teachers):
    folder, _, _, _ = two_teachers
    result = distill_flow.fn(str(folder))
    assert result["training"]["epochs_run"] >= 1
    assert (folder / "student_distilled.pt").exists()
