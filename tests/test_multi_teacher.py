"""Several teachers: an audio-only teacher from an earlier run joins the audio-visual teacher's targets."""

from __future__ import annotations

import pytest
import torch

from mmkd.checkpoints import load_checkpoint
from mmkd.data.loading import load_dataset
from mmkd.flows._common import RunPaths
from mmkd.flows.distill import combined_logits, distill_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.training import predict

from conftest import prepared_run


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


LAYER = "encoders.audio.encoder.stages.1"


def test_teacher_layer_stored_and_distilled(tmp_path, small_avdigits, two_teachers):
    from mmkd.features import FeatureStore, layer_output

    source, _, _, _ = two_teachers
    folder, config = prepared_run(
        tmp_path, small_avdigits, "layers", teacher={"checkpoint": str(source / "teacher.pt")},
        extract={"layers": [LAYER]},
        distill={"losses": [{"name": "hinton"}, {"name": "mse", "teacher_features": f"layer:{LAYER}"}]},
    )
    teacher_flow.fn(str(folder))
    extracted = extract_flow.fn(str(folder))
    assert extracted["computed"] == 120
    assert "-float32-layers-" in extracted["folder"]

    dataset = load_dataset(config.data)
    teacher, metadata = load_checkpoint(folder / "teacher.pt", config)
    seen = []
    teacher.get_submodule(LAYER).register_forward_hook(lambda _m, _i, out: seen.append(out.mean(dim=(2, 3))))
    predict(teacher, dataset)
    store = FeatureStore(folder.parent / "feature-store", metadata["fingerprint"], layers=[LAYER])
    stored = store.get_outputs(dataset.keys, (layer_output(LAYER),))[layer_output(LAYER)]
    assert stored.shape == (120, 16)
    assert torch.allclose(stored, torch.cat(seen), atol=1e-5)

    result = distill_flow.fn(str(folder))
    assert result["training"]["loss_terms"] == ["hinton", "mse"]


def test_unknown_teacher_layer_named(tmp_path, small_avdigits, two_teachers):
    from mmkd.errors import ConfigError

    source, _, _, _ = two_teachers
    folder, _ = prepared_run(tmp_path, small_avdigits, "bad-layer", teacher={"checkpoint": str(source / "teacher.pt")},
                             extract={"layers": ["encoders.audio.nothing"]})
    teacher_flow.fn(str(folder))
    with pytest.raises(ConfigError, match=r"the teacher has no module 'encoders.audio.nothing'; some of its modules: .*encoders.audio"):
        extract_flow.fn(str(folder))
