"""The distillation objective: loss terms, alignment with the teacher, and alignment between modalities."""

from __future__ import annotations

import pytest
import torch

from mmkd.checkpoints import build_model
from mmkd.config import config_from_dict
from mmkd.distillation import DistillationObjective
from mmkd.errors import ConfigError
from mmkd.registry import get_registry

from conftest import TINY_CONFIG

CLASSES = [str(d) for d in range(10)]


def tiny_config(tmp_path, **distill):
    return config_from_dict(
        {**TINY_CONFIG, "data": {"manifest": "m.csv"}, "distill": {**TINY_CONFIG["distill"], **distill}},
        base_dir=tmp_path,
    )


def batch(rows: int, mask: torch.Tensor):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(rows, 1, 28, 28, generator=generator)
    audio = torch.randn(rows, 10800, generator=generator) * 0.1
    return (images, audio, mask), torch.arange(rows) % 10, torch.arange(rows)


def test_alignment_between_modalities_uses_rows_with_both(tmp_path):
    config = tiny_config(
        tmp_path,
        losses=[{"name": "hinton"}],
        alignment=[{"name": "deep_coral", "weight": 2.0, "modalities": ["image", "audio"]}],
    )
    torch.manual_seed(0)
    student = build_model(config, "student", CLASSES).train()
    objective = DistillationObjective(
        config.distill.losses, student_dim=student.embedding_dim, teacher_dim=32,
        teacher_logits=torch.randn(6, 10), teacher_embeddings=torch.randn(6, 32),
        alignment=config.distill.alignment, student=student,
    )
    assert objective.names == ["hinton", "deep_coral:image-audio"]

    # Rows 1 and 4 lack audio, so the term reads rows 0, 2, 3 and 5 only.
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True], [True, False], [True, True]])
    inputs = batch(6, mask)
    outputs = student(*inputs[0])
    total, values = objective(outputs, inputs)

    image, audio = student.modality_features
    both = mask.all(dim=1)
    expected = objective.terms[1](image[both], audio[both])
    assert values["deep_coral:image-audio"] == pytest.approx(float(expected), rel=1e-6)
    assert float(total) == pytest.approx(values["hinton"] + 2.0 * values["deep_coral:image-audio"], rel=1e-6)

    # The gradient of the term reaches the image encoder but not the audio encoder (the target).
    student.zero_grad()
    objective.terms[1](image[both], audio[both]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.encoders["image"].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.encoders["audio"].parameters())


def test_modality_alignment_one_shared_row_is_zero(tmp_path):
    config = tiny_config(tmp_path, alignment=[{"name": "clip", "modalities": ["audio", "image"]}])
    student = build_model(config, "student", CLASSES).train()
    objective = DistillationObjective(
        config.distill.losses, student_dim=student.embedding_dim, teacher_dim=32,
        teacher_logits=torch.randn(3, 10), teacher_embeddings=torch.randn(3, 32),
        alignment=config.distill.alignment, student=student,
    )
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    inputs = batch(3, mask)
    _, values = objective(student(*inputs[0]), inputs)
    assert values["clip:audio-image"] == 0.0


def test_alignment_modalities_must_be_two_of_the_data(tmp_path):
    with pytest.raises(ConfigError, match=r"must name two different modalities the student reads: \['image', 'audio'\]"):
        tiny_config(tmp_path, alignment=[{"name": "clip", "modalities": ["image", "image"]}])


def test_alignment_with_the_teacher_compares_fused_embeddings(tmp_path):
    config = tiny_config(tmp_path, losses=[{"name": "kl"}], alignment=[{"name": "cca"}])
    student = build_model(config, "student", CLASSES).train()
    teacher_embeddings = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    objective = DistillationObjective(
        config.distill.losses, student_dim=student.embedding_dim, teacher_dim=32,
        teacher_logits=torch.randn(8, 10), teacher_embeddings=teacher_embeddings,
        alignment=config.distill.alignment, student=student,
    )
    inputs = batch(8, torch.ones(8, 2, dtype=torch.bool))
    logits, embedding = student(*inputs[0])
    _, values = objective((logits, embedding), inputs)
    assert type(objective.terms[1]) is get_registry("alignment").get("cca")
    assert values["cca"] == pytest.approx(float(objective.terms[1](embedding, teacher_embeddings)), rel=1e-6)


def test_feature_term_can_target_one_teacher_modality(tmp_path):
    config = tiny_config(tmp_path, losses=[{"name": "mse", "teacher_features": "audio"}])
    student = build_model(config, "student", CLASSES).train()
    generator = torch.Generator().manual_seed(2)
    per_modality = torch.randn(8, 2, 16, generator=generator)
    fused = torch.randn(8, 32, generator=generator)
    inputs = batch(8, torch.ones(8, 2, dtype=torch.bool))
    outputs = student(*inputs[0])

    torch.manual_seed(3)
    objective = DistillationObjective(
        config.distill.losses, student_dim=student.embedding_dim, teacher_dim=32,
        teacher_logits=torch.randn(8, 10), teacher_embeddings=fused,
        teacher_targets={"image": per_modality[:, 0], "audio": per_modality[:, 1]},
    )
    _, values = objective(outputs, inputs)

    # The same term built against the audio embeddings as if they were the fused ones.
    plain = tiny_config(tmp_path, losses=[{"name": "mse"}])
    torch.manual_seed(3)
    reference = DistillationObjective(
        plain.distill.losses, student_dim=student.embedding_dim, teacher_dim=16,
        teacher_logits=torch.randn(8, 10), teacher_embeddings=per_modality[:, 1],
    )
    _, expected = reference(outputs, inputs)
    assert values["mse"] == pytest.approx(expected["mse"], rel=1e-6)


def test_teacher_modality_outside_data_rejected(tmp_path):
    raw = {**TINY_CONFIG, "data": {"manifest": "m.csv", "modalities": ["audio"]},
           "distill": {"losses": [{"name": "mse", "teacher_features": "image"}]}}
    with pytest.raises(ConfigError, match=r"teacher_features 'image' is not one of the teacher's modalities \['audio'\]"):
        config_from_dict(raw, base_dir=tmp_path)


def test_teacher_modality_needs_stored_modality_embeddings(tmp_path):
    config = tiny_config(tmp_path, losses=[{"name": "mse", "teacher_features": "image"}])
    with pytest.raises(ValueError, match="compares with the teacher's image features, but the stored teacher outputs have only fused"):
        DistillationObjective(config.distill.losses, student_dim=16, teacher_dim=32,
                              teacher_logits=torch.randn(8, 10), teacher_embeddings=torch.randn(8, 32))
