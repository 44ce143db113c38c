"""A student that reads fewer modalities than its teacher: audio-only, taught by an audio-visual teacher."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from mmkd.checkpoints import load_checkpoint
from mmkd.config import config_from_dict, load_config, save_config
from mmkd.data.loading import load_dataset
from mmkd.errors import ConfigError
from mmkd.features import FeatureStore
from mmkd.flows.distill import distill_flow
from mmkd.flows.evaluate import evaluate_flow
from mmkd.flows.export import export_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.training import predict

from conftest import TINY_CONFIG, write_config


@pytest.fixture(scope="module")
def audio_only_run(tmp_path_factory, small_avdigits, prefect_server):
    """A finished run up to export whose student and baseline read audio alone."""
    root = tmp_path_factory.mktemp("cross-modal")
    config = load_config(write_config(root / "configs", small_avdigits, student={"modalities": ["audio"]}))
    folder = root / "run-1"
    folder.mkdir()
    save_config(config, folder / "config.yaml")
    for stage in (teacher_flow, extract_flow, distill_flow, finetune_flow, evaluate_flow):
        stage.fn(str(folder))
    return folder, config, export_flow.fn(str(folder))


def test_teacher_reads_both_and_student_audio_only(audio_only_run):
    folder, config, _ = audio_only_run
    teacher, _ = load_checkpoint(folder / "teacher.pt", config)
    assert teacher.modalities == ["image", "audio"]
    for name in ("student.pt", "student_distilled.pt", "baseline.pt"):
        model, metadata = load_checkpoint(folder / name, config)
        assert model.modalities == ["audio"]
        assert metadata["modalities"] == ["audio"]
        assert not [key for key in model.state_dict() if key.startswith("encoders.image")]


def test_student_and_baseline_are_the_same_size(audio_only_run):
    folder, _, _ = audio_only_run
    metrics = evaluate_flow.fn(str(folder))
    assert metrics["student"]["params"] == metrics["baseline"]["params"]
    assert metrics["student"]["params"] < metrics["teacher"]["params"]


def test_distillation_read_the_audio_visual_teacher_outputs(audio_only_run):
    folder, config, _ = audio_only_run
    teacher, metadata = load_checkpoint(folder / "teacher.pt", config)
    dataset = load_dataset(config.data)
    store = FeatureStore(folder.parent / "feature-store", metadata["fingerprint"])
    stored_logits, _ = store.get(dataset.keys)
    # Both modalities shaped the stored targets: the teacher's logits move when images are blanked.
    expected, _ = predict(teacher, dataset)
    assert torch.allclose(stored_logits, expected, atol=1e-5)
    blanked = dataset.with_modalities(["image", "audio"])
    blanked.inputs = {**blanked.inputs, "image": torch.zeros_like(blanked.inputs["image"])}
    assert not torch.allclose(predict(teacher, blanked)[0], expected, atol=1e-3)


def test_student_ignores_the_images_it_will_not_have(audio_only_run):
    folder, config, _ = audio_only_run
    student, _ = load_checkpoint(folder / "student.pt", config)
    test = load_dataset(config.data).subset("test")
    noisy = test.with_modalities(["image", "audio"])
    noisy.inputs = {**noisy.inputs, "image": torch.randn_like(noisy.inputs["image"])}
    assert torch.equal(predict(student, noisy)[0], predict(student, test)[0])


def test_onnx_student_audio_inputs_only(audio_only_run):
    folder, _, report = audio_only_run
    student = onnx.load(str(folder / "student.onnx"))
    inputs = {i.name: i for i in student.graph.input}
    assert list(inputs) == ["audio", "mask"]
    mask_dims = inputs["mask"].type.tensor_type.shape.dim
    assert mask_dims[1].dim_value == 1
    metadata = {p.key: p.value for p in student.metadata_props}
    assert json.loads(metadata["inputs"]) == ["audio", "mask"]
    teacher = onnx.load(str(folder / "teacher.onnx"))
    assert [i.name for i in teacher.graph.input] == ["image", "audio", "mask"]
    assert report["student"]["max_abs_diff"] <= 1e-4


def test_student_modality_outside_the_data_is_refused(tmp_path):
    raw = {**TINY_CONFIG, "data": {"manifest": "m.csv", "modalities": ["audio"]}, "student": {"modalities": ["image"]}}
    with pytest.raises(ConfigError, match=r"student\.modalities: \['image'\] must name each modality once.*\['audio'\]"):
        config_from_dict(raw, base_dir=tmp_path)


def test_alignment_missing_modality_rejected(tmp_path):
    raw = {
        **TINY_CONFIG, "data": {"manifest": "m.csv"}, "student": {"modalities": ["audio"]},
        "distill": {"alignment": [{"name": "clip", "modalities": ["image", "audio"]}]},
    }
    with pytest.raises(ConfigError, match=r"distill\.alignment\[0\]\.modalities.*the student reads: \['audio'\]"):
        config_from_dict(raw, base_dir=tmp_path)
