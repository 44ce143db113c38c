"""The interpretability computations against independent ones on small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd.checkpoints import build_model
from mmkd.config import config_from_dict
from mmkd.interpret import (
    calibration,
    cka_matrix,
    comparable_layers,
    disagreements,
    fusion_attention,
    layer_outputs,
    linear_cka,
    modality_contributions,
    pca_2d,
    probabilities,
    tsne_2d,
    without_modality,
)

from conftest import TINY_CONFIG

CLASSES = [str(d) for d in range(10)]


def kernel_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from its kernel form, tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), written out separately."""
    x, y = x.double(), y.double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    return float(torch.trace(k @ h @ l @ h) / torch.sqrt(torch.trace(k @ h @ k @ h) * torch.trace(l @ h @ l @ h)))


def test_cka_matches_the_kernel_form():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator)
    y = x[:, :3] @ torch.randn(3, 5, generator=generator) + 0.5 * torch.randn(40, 5, generator=generator)
    assert linear_cka(x, y) == pytest.approx(kernel_cka(x, y), abs=1e-12)


def test_cka_ignores_rotation_and_scale():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator))
    assert linear_cka(x, 3.7 * x @ rotation + 2.0) == pytest.approx(1.0, abs=1e-12)


def test_cka_sees_an_unequal_scaling():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    stretched = x * torch.tensor([1.0, 1.0, 1.0, 20.0])
    assert linear_cka(x, stretched) < 0.9


def test_cka_of_constant_representation_is_zero():
    assert linear_cka(torch.randn(10, 3), torch.ones(10, 4)) == 0.0


def test_cka_matrix_lists_first_by_second():
    generator = torch.Generator().manual_seed(3)
    first = {"a": torch.randn(30, 4, generator=generator), "b": torch.randn(30, 2, generator=generator)}
    second = {"c": first["b"] * 2, "d": torch.randn(30, 5, generator=generator), "e": first["a"]}
    matrix = cka_matrix(first, second)
    assert matrix.shape == (2, 3)
    assert matrix[1, 0] == pytest.approx(1.0)
    assert matrix[0, 2] == pytest.approx(1.0)
    assert matrix[0, 1] == pytest.approx(kernel_cka(first["a"], second["d"]))


def test_pca_matches_scikit_learn():
    from sklearn.decomposition import PCA

    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(4)) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    ours = pca_2d(x)
    theirs = PCA(n_components=2).fit(x.numpy().astype(np.float64))
    expected = theirs.transform(x.numpy().astype(np.float64))
    for component in range(2):
        sign = np.sign(ours.points[0, component] * expected[0, component])
        assert np.allclose(ours.points[:, component], sign * expected[:, component], atol=1e-8)
    assert np.allclose(ours.explained, theirs.explained_variance_ratio_, atol=1e-10)


def test_pca_of_line_explains_everything():
    t = torch.linspace(-1, 1, 20)[:, None]
    line = t * torch.tensor([[1.0, 2.0, -1.0]])
    assert pca_2d(line).explained[0] == pytest.approx(1.0)


def test_pca_signs_are_fixed():
    x = torch.randn(25, 4, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(pca_2d(x).points, pca_2d(x.clone()).points)


def separated_clusters(rows_per_cluster: int = 20) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(6)
    centres = torch.eye(3, 10) * 20
    x = torch.cat([centre + torch.randn(rows_per_cluster, 10, generator=generator) for centre in centres])
    return x, np.repeat(np.arange(3), rows_per_cluster)


def test_tsne_keeps_separated_clusters_apart():
    x, labels = separated_clusters()
    points = tsne_2d(x, seed=0).points
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    assert np.array_equal(labels[distances.argmin(axis=1)], labels)


def test_tsne_repeats_with_its_seed():
    x, _ = separated_clusters(5)
    assert np.array_equal(tsne_2d(x, seed=3).points, tsne_2d(x, seed=3).points)


def test_tsne_lowers_perplexity_for_few_rows():
    x, _ = separated_clusters(4)
    assert tsne_2d(x).method == "t-SNE (perplexity 3.66667)"


def tiny_config(**changes):
    return config_from_dict({**TINY_CONFIG, "data": {"manifest": "m.csv"}, **changes}, base_dir=Path("."))


def random_inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, 1, 28, 28, generator=generator)
    audio = torch.randn(rows, 10_800, generator=generator) * 0.1
    return images, audio, torch.ones(rows, 2, dtype=torch.bool)


@pytest.fixture
def student_ignoring_audio():
    """The tiny concat student with its head's weights on the audio embedding set to zero."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), "student", CLASSES).eval()
    width = model.embed_dim
    with torch.no_grad():
        model.head[1].weight[:, width:] = 0
    return model


def test_masking_an_ignored_modality_changes_nothing(student_ignoring_audio):
    inputs = random_inputs(40)
    labels = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(1))
    audio = next(r for r in modality_contributions(student_ignoring_audio, inputs, labels) if r["modality"] == "audio")
    assert audio["total_variation"] == 0.0
    assert audio["changed_predictions"] == 0.0
    assert audio["accuracy_drop"] == 0.0


def test_masked_image_matches_direct_forward(student_ignoring_audio):
    inputs = random_inputs(40)
    labels = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(1))
    image = next(r for r in modality_contributions(student_ignoring_audio, inputs, labels) if r["modality"] == "image")

    # The same masking done by hand: the image column of the mask set to False.
    mask = inputs[2].clone()
    mask[:, 0] = False
    with torch.no_grad():
        full = torch.softmax(student_ignoring_audio(*inputs)[0].double(), dim=1)
        masked = torch.softmax(student_ignoring_audio(inputs[0], inputs[1], mask)[0].double(), dim=1)
    assert image["total_variation"] == pytest.approx(float(0.5 * (full - masked).abs().sum(1).mean()), abs=1e-12)
    assert image["accuracy_without"] == pytest.approx(float((masked.argmax(1) == labels).double().mean()))
    assert image["total_variation"] > 0


def test_without_modality_leaves_the_inputs_alone():
    inputs = random_inputs(3)
    masked = without_modality(inputs, ["image", "audio"], "audio")
    assert masked[2][:, 1].tolist() == [False] * 3
    assert inputs[2].all()


def test_attention_to_missing_modality_is_zero():
    torch.manual_seed(0)
    teacher = build_model(tiny_config(), "teacher", CLASSES).eval()
    images, audio, mask = random_inputs(12)
    mask[:, 1] = False
    labels = torch.arange(12) % 10
    attention = fusion_attention(teacher, (images, audio, mask), labels, CLASSES)
    overall = attention["overall"]
    assert overall.shape == (2, 2, 2)
    assert np.allclose(overall[:, :, 1], 0.0)
    assert np.allclose(overall.sum(axis=2), 1.0)
    assert set(attention["by_class"]) == set(CLASSES)


def test_fusion_without_attention_has_no_map(student_ignoring_audio):
    assert fusion_attention(student_ignoring_audio, random_inputs(4), torch.zeros(4, dtype=torch.long), CLASSES) is None


def test_comparable_layers_end_at_fusion():
    teacher = build_model(tiny_config(), "teacher", CLASSES)
    names = comparable_layers(teacher)
    assert names[0] == "encoders.image.stages.0"
    assert names[-1] == "fusion"
    assert names.index("encoders.image") < names.index("encoders.audio.encoder.stages.0")


def test_cka_of_layer_with_itself_is_one():
    torch.manual_seed(0)
    teacher = build_model(tiny_config(), "teacher", CLASSES)
    outputs = layer_outputs(teacher, random_inputs(30), comparable_layers(teacher))
    assert np.allclose(np.diag(cka_matrix(outputs, outputs)), 1.0)
    assert outputs["fusion"].shape == (30, 32)


def test_probabilities_sum_to_one(student_ignoring_audio):
    probs = probabilities(student_ignoring_audio, random_inputs(5), batch_rows=2)
    assert torch.allclose(probs.sum(1), torch.ones(5, dtype=torch.float64))


def test_calibration_error_matches_a_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = torch.tensor([0, 0, 0, 1])
    result = calibration(probs, labels, bins=4)
    # Bin [0.5, 0.75): confidences 0.6 and 0.55, both right. Bin [0.75, 1]: 0.9 right, 0.8 wrong.
    # ECE = 0.5 * |1 - 0.575| + 0.5 * |0.5 - 0.85| = 0.2125 + 0.175.
    assert result["ece"] == pytest.approx(0.3875)
    assert [b["rows"] for b in result["bins"]] == [0, 0, 2, 2]
    assert result["bins"][3]["accuracy"] == 0.5


def test_calibration_puts_certainty_in_last_bin():
    result = calibration(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), bins=10)
    assert result["bins"][9]["rows"] == 1


def test_disagreements_rank_by_total_variation():
    teacher = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    student = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])
    ranked = disagreements(teacher, student, count=2)
    assert [entry["row"] for entry in ranked] == [1, 2]
    assert ranked[0]["total_variation"] == pytest.approx(0.4)
    assert (ranked[0]["teacher"], ranked[0]["student"]) == (0, 1)
