"""Tests of the distillation losses beyond kl, hinton and mse.

They cover the feature, relation and decoupled-logit terms, and one gradient property of
the existing kl term.

Each loss is checked against a reference written in this file with numpy and scipy on
small fixed inputs, so the references share no code with the torch implementations.
The losses are built from their classes because they are not yet registered as entry
points.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.spatial.distance import pdist, squareform
from scipy.special import logsumexp, softmax

from mmkd.plugin_api import DistillationInputs, LossPlugin
from mmkd.plugins.feature_losses import AttentionTransferLoss, CosineLoss, FeatureMSELoss, FitNetsLoss
from mmkd.plugins.losses import DKDLoss, KLDivergenceLoss
from mmkd.plugins.relation_losses import (
    CKALoss,
    CLIPKDLoss,
    CRDLoss,
    PKTLoss,
    RKDLoss,
    SimilarityPreservingLoss,
)

STUDENT_DIM = 6
TEACHER_DIM = 10
NUM_CLASSES = 4
BATCH = 5

# Every new loss, with the student input its gradient must reach.
NEW_LOSSES: list[tuple[type[LossPlugin], str]] = [
    (FitNetsLoss, "student_features"),
    (CosineLoss, "student_features"),
    (AttentionTransferLoss, "student_features"),
    (SimilarityPreservingLoss, "student_features"),
    (RKDLoss, "student_features"),
    (PKTLoss, "student_features"),
    (CRDLoss, "student_features"),
    (DKDLoss, "student_logits"),
    (CKALoss, "student_features"),
    (CLIPKDLoss, "student_features"),
]
FEATURE_LOSSES = [
    loss_class for loss_class, student_input in NEW_LOSSES if student_input == "student_features"
]
# Losses that compare rows of a batch with each other, with options that leave only that part.
RELATION_CASES: list[tuple[type[LossPlugin], dict[str, object]]] = [
    (SimilarityPreservingLoss, {}),
    (RKDLoss, {}),
    (PKTLoss, {}),
    (CKALoss, {}),
    (CLIPKDLoss, {"feature_weight": 0.0}),
    (CRDLoss, {}),
]


def _array(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _inputs(
    student_features: np.ndarray,
    teacher_features: np.ndarray,
    *,
    student_logits: np.ndarray | None = None,
    teacher_logits: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> DistillationInputs:
    batch = student_features.shape[0]
    zeros = np.zeros((batch, NUM_CLASSES))
    student_logits = zeros if student_logits is None else student_logits
    teacher_logits = zeros if teacher_logits is None else teacher_logits
    return DistillationInputs(
        student_logits=torch.tensor(student_logits, dtype=torch.float32),
        teacher_logits=torch.tensor(teacher_logits, dtype=torch.float32),
        student_features=torch.tensor(student_features, dtype=torch.float32),
        teacher_features=torch.tensor(teacher_features, dtype=torch.float32),
        labels=torch.tensor(np.zeros(batch, dtype=np.int64) if labels is None else labels),
    )


def _random_inputs(seed: int, batch: int = BATCH, *, requires_grad: bool = False) -> DistillationInputs:
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(batch, NUM_CLASSES, generator=generator),
        torch.randn(batch, NUM_CLASSES, generator=generator),
        torch.randn(batch, STUDENT_DIM, generator=generator),
        torch.randn(batch, TEACHER_DIM, generator=generator),
    ]
    if requires_grad:
        tensors = [tensor.requires_grad_() for tensor in tensors]
    labels = torch.arange(batch) % NUM_CLASSES
    return DistillationInputs(*tensors, labels=labels)


def _weights(layer: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()


def _set_linear(layer: torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))


def _row_normalise(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def _kl_rows(target: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """KL(target || predicted) of each row of two probability matrices."""
    return np.sum(target * np.log(target / predicted), axis=1)


def _without_diagonal(matrix: np.ndarray) -> np.ndarray:
    n = matrix.shape[0]
    return np.array([[matrix[i, j] for j in range(n) if j != i] for i in range(n)])


# Contract shared by every new loss


@pytest.mark.parametrize(("loss_class", "student_input"), NEW_LOSSES)
def test_new_loss_meets_contract(loss_class: type[LossPlugin], student_input: str) -> None:
    torch.manual_seed(0)
    plugin = loss_class(loss_class.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    # A first training call fills the CRD memory bank, so the checked call reads it.
    plugin(_random_inputs(seed=2))
    inputs = _random_inputs(seed=3, requires_grad=True)

    loss = plugin(inputs)
    loss.backward()

    assert loss.dim() == 0
    assert torch.isfinite(loss)
    student_grad = getattr(inputs, student_input).grad
    assert student_grad is not None
    assert torch.isfinite(student_grad).all()
    assert student_grad.abs().sum() > 0
    assert inputs.teacher_logits.grad is None
    assert inputs.teacher_features.grad is None
    for param_name, param in plugin.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} got a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} got an all-zero gradient"


@pytest.mark.parametrize("loss_class", [loss_class for loss_class, _ in NEW_LOSSES])
def test_new_loss_is_deterministic_for_seed(loss_class: type[LossPlugin]) -> None:
    values = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        plugin = loss_class(loss_class.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
        values.append(plugin(_random_inputs(seed=4)).item())

    assert values[0] == values[1]
    if list(plugin.parameters()):
        # The seed sets the initial projection, so another seed gives another value.
        assert values[2] != values[0]


@pytest.mark.parametrize(("loss_class", "options"), RELATION_CASES)
def test_relation_loss_of_one_row_is_zero(
    loss_class: type[LossPlugin], options: dict[str, object]
) -> None:
    # One row has no pair to compare, and CRD's single candidate is the positive itself.
    torch.manual_seed(0)
    plugin = loss_class(loss_class.Params(**options), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    inputs = _random_inputs(seed=5, batch=1, requires_grad=True)

    loss = plugin(inputs)
    loss.backward()

    assert loss.item() == 0.0
    assert inputs.student_features.grad is not None


@pytest.mark.parametrize(("loss_class", "options"), RELATION_CASES)
def test_relation_loss_handles_repeated_and_zero_rows(
    loss_class: type[LossPlugin], options: dict[str, object]
) -> None:
    torch.manual_seed(0)
    plugin = loss_class(loss_class.Params(**options), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    inputs = _random_inputs(seed=6, requires_grad=True)
    with torch.no_grad():
        for tensor in (inputs.student_features, inputs.teacher_features):
            tensor[1] = tensor[0]
            tensor[2] = 0.0

    loss = plugin(inputs)
    loss.backward()

    assert torch.isfinite(loss)
    assert torch.isfinite(inputs.student_features.grad).all()


@pytest.mark.parametrize("loss_class", FEATURE_LOSSES)
def test_feature_loss_rejects_wrong_width(loss_class: type[LossPlugin]) -> None:
    plugin = loss_class(loss_class.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    inputs = _inputs(_array(0, BATCH, STUDENT_DIM + 1), _array(1, BATCH, TEACHER_DIM))

    with pytest.raises(
        ValueError,
        match=r"built for student_dim 6 and teacher_dim 10, but got student features of shape \(5, 7\)",
    ):
        plugin(inputs)


def test_feature_loss_rejects_unequal_row_counts() -> None:
    plugin = CKALoss(CKALoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    inputs = _inputs(_array(0, 4, STUDENT_DIM), _array(1, 5, TEACHER_DIM))

    with pytest.raises(ValueError, match=r"got 4 rows of student features but 5 rows of teacher"):
        plugin(inputs)


@pytest.mark.parametrize("loss_class", [CosineLoss, AttentionTransferLoss, CLIPKDLoss])
def test_projection_off_rejects_unequal_dims(loss_class: type[LossPlugin]) -> None:
    params = loss_class.Params(projection=False)

    with pytest.raises(ValueError, match=r"student_dim is 6 and teacher_dim is 10\. Set projection: true"):
        loss_class(params, student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)


@pytest.mark.parametrize(
    ("loss_class", "options", "field"),
    [
        (FitNetsLoss, {"hidden": -1}, "hidden"),
        (FitNetsLoss, {"hiden": 8}, "hiden"),
        (AttentionTransferLoss, {"exponent": 0.5}, "exponent"),
        (SimilarityPreservingLoss, {"normalize": True}, "normalize"),
        (RKDLoss, {"angle_weight": -1.0}, "angle_weight"),
        (CRDLoss, {"temperature": 0.0}, "temperature"),
        (CRDLoss, {"memory_size": -5}, "memory_size"),
        (DKDLoss, {"warmup_steps": -1}, "warmup_steps"),
        (DKDLoss, {"beta": 101.0}, "beta"),
        (CLIPKDLoss, {"temperature": -0.1}, "temperature"),
    ],
)
def test_new_params_reject_invalid_options(
    loss_class: type[LossPlugin], options: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError, match=rf"(?m)^{field}\n"):
        loss_class.Params(**options)


# Hinton's gradient property of the existing soft-target term


def test_kl_gradient_is_temperature_times_probability_gap() -> None:
    temperature = 3.0
    student = np.array([[1.0, -0.5, 2.0, 0.3]])
    teacher = np.array([[2.5, 0.0, -1.0, 0.7]])
    loss = KLDivergenceLoss(
        KLDivergenceLoss.Params(temperature=temperature), student_dim=1, teacher_dim=1
    )
    inputs = _inputs(
        np.zeros((1, 1)), np.zeros((1, 1)), student_logits=student, teacher_logits=teacher
    )
    inputs.student_logits.requires_grad_()

    loss(inputs).backward()
    student_probs = softmax(student / temperature, axis=1)
    teacher_probs = softmax(teacher / temperature, axis=1)
    expected = temperature * (student_probs - teacher_probs)

    np.testing.assert_allclose(inputs.student_logits.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


# FitNets


def test_fitnets_mlp_matches_numpy() -> None:
    torch.manual_seed(0)
    loss = FitNetsLoss(FitNetsLoss.Params(hidden=3), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    student, teacher = _array(0, BATCH, STUDENT_DIM), _array(1, BATCH, TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()
    first_weight, first_bias = _weights(loss.regressor[0])
    second_weight, second_bias = _weights(loss.regressor[2])
    hidden = np.maximum(student @ first_weight.T + first_bias, 0.0)
    predicted = hidden @ second_weight.T + second_bias
    expected = np.mean((predicted - teacher) ** 2)

    assert value == pytest.approx(expected, rel=1e-5)


def test_fitnets_linear_equals_mse_with_same_weights() -> None:
    student, teacher = _array(2, BATCH, STUDENT_DIM), _array(3, BATCH, TEACHER_DIM)
    weight, bias = _array(4, TEACHER_DIM, STUDENT_DIM), _array(5, TEACHER_DIM)
    fitnets = FitNetsLoss(FitNetsLoss.Params(hidden=0), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    mse = FeatureMSELoss(FeatureMSELoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    _set_linear(fitnets.regressor, weight, bias)
    _set_linear(mse.projection, weight, bias)

    fitnets_value = fitnets(_inputs(student, teacher)).item()
    mse_value = mse(_inputs(student, teacher)).item()
    expected = np.mean((student @ weight.T + bias - teacher) ** 2)

    assert fitnets_value == pytest.approx(expected, rel=1e-5)
    assert fitnets_value == pytest.approx(mse_value, rel=1e-6)


# Cosine


def test_cosine_hand_value_without_projection() -> None:
    # Row 0 is orthogonal (cosine 0), row 1 has the same direction (cosine 1).
    student = np.array([[1.0, 0.0], [1.0, 1.0]])
    teacher = np.array([[0.0, 3.0], [2.0, 2.0]])
    loss = CosineLoss(CosineLoss.Params(projection=False), student_dim=2, teacher_dim=2)

    value = loss(_inputs(student, teacher)).item()

    assert value == pytest.approx(0.5, abs=1e-6)
    assert list(loss.parameters()) == []


def test_cosine_with_projection_matches_numpy() -> None:
    torch.manual_seed(0)
    loss = CosineLoss(CosineLoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    student, teacher = _array(6, BATCH, STUDENT_DIM), _array(7, BATCH, TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()
    weight, bias = _weights(loss.projection)
    projected = student @ weight.T + bias
    cosines = np.sum(_row_normalise(projected) * _row_normalise(teacher), axis=1)

    assert value == pytest.approx(np.mean(1.0 - cosines), rel=1e-5)


# Attention transfer


def test_attention_transfer_hand_value_is_unsquared_norm() -> None:
    # |s|^2 = (9, 16) and |t|^2 = (16, 9) both have norm sqrt(337), so the attention
    # vectors differ by (-7, 7) / sqrt(337), whose norm is 7 * sqrt(2) / sqrt(337).
    loss = AttentionTransferLoss(
        AttentionTransferLoss.Params(projection=False), student_dim=2, teacher_dim=2
    )

    value = loss(_inputs(np.array([[3.0, -4.0]]), np.array([[4.0, 3.0]]))).item()

    assert value == pytest.approx(7.0 * math.sqrt(2.0) / math.sqrt(337.0), rel=1e-6)
    assert value != pytest.approx(98.0 / 337.0, rel=1e-2)  # the squared norm


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_attention_transfer_matches_numpy(exponent: float) -> None:
    torch.manual_seed(0)
    params = AttentionTransferLoss.Params(exponent=exponent)
    loss = AttentionTransferLoss(params, student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    student, teacher = _array(8, BATCH, STUDENT_DIM), _array(9, BATCH, TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()
    weight, bias = _weights(loss.projection)
    student_attention = _row_normalise(np.abs(student @ weight.T + bias) ** exponent)
    teacher_attention = _row_normalise(np.abs(teacher) ** exponent)
    expected = np.mean(np.linalg.norm(student_attention - teacher_attention, axis=1))

    assert value == pytest.approx(expected, rel=1e-5)


# Similarity preserving


def test_similarity_preserving_matches_numpy() -> None:
    student, teacher = _array(10, BATCH, STUDENT_DIM), _array(11, BATCH, TEACHER_DIM)
    loss = SimilarityPreservingLoss(
        SimilarityPreservingLoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM
    )

    value = loss(_inputs(student, teacher)).item()
    student_gram = _row_normalise(student @ student.T)
    teacher_gram = _row_normalise(teacher @ teacher.T)
    expected = np.sum((student_gram - teacher_gram) ** 2) / BATCH**2

    assert expected > 0.01
    assert value == pytest.approx(expected, rel=1e-5)


def test_similarity_preserving_ignores_row_scale_of_gram() -> None:
    # Scaling the whole teacher matrix scales its Gram rows, which the row norm undoes.
    student = _array(12, BATCH, STUDENT_DIM)
    loss = SimilarityPreservingLoss(
        SimilarityPreservingLoss.Params(), student_dim=STUDENT_DIM, teacher_dim=STUDENT_DIM
    )

    value = loss(_inputs(student, 5.0 * student)).item()

    assert value == pytest.approx(0.0, abs=1e-10)


# RKD


def _reference_rkd(
    student: np.ndarray, teacher: np.ndarray, distance_weight: float, angle_weight: float
) -> float:
    def huber(x: np.ndarray) -> np.ndarray:
        return np.where(np.abs(x) < 1.0, 0.5 * x**2, np.abs(x) - 0.5)

    def relations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Each unordered pair once, which has the same mean as the ordered pairs.
        distances = pdist(x)
        square = squareform(distances)
        n = x.shape[0]
        cosines = []
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    if len({i, j, k}) == 3:
                        first = (x[i] - x[j]) / square[i, j]
                        second = (x[k] - x[j]) / square[k, j]
                        cosines.append(first @ second)
        return distances / distances.mean(), np.array(cosines)

    student_distances, student_cosines = relations(student)
    teacher_distances, teacher_cosines = relations(teacher)
    distance_term = np.mean(huber(student_distances - teacher_distances))
    angle_term = np.mean(huber(student_cosines - teacher_cosines))
    return distance_weight * distance_term + angle_weight * angle_term


def test_rkd_matches_numpy() -> None:
    # Scaled so that some distance gaps exceed 1 and reach the linear part of the Huber loss.
    student = 3.0 * _array(13, BATCH, STUDENT_DIM)
    teacher = _array(14, BATCH, TEACHER_DIM)
    student[0] *= 4.0
    params = RKDLoss.Params(distance_weight=2.0, angle_weight=3.0)
    loss = RKDLoss(params, student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()
    expected = _reference_rkd(student, teacher, 2.0, 3.0)

    assert expected > 0.1
    assert value == pytest.approx(expected, rel=1e-5)


def test_rkd_of_rotated_shifted_scaled_copy_is_zero() -> None:
    teacher = _array(15, 8, TEACHER_DIM)
    rotation, _ = np.linalg.qr(_array(16, TEACHER_DIM, TEACHER_DIM))
    student = 2.5 * teacher @ rotation + _array(17, TEACHER_DIM)
    loss = RKDLoss(RKDLoss.Params(), student_dim=TEACHER_DIM, teacher_dim=TEACHER_DIM)
    unrelated = _array(18, 8, TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()
    unrelated_value = loss(_inputs(unrelated, teacher)).item()

    assert list(loss.parameters()) == []
    assert value == pytest.approx(0.0, abs=1e-6)
    assert unrelated_value > 0.1


# PKT


def test_pkt_matches_numpy() -> None:
    student, teacher = _array(19, BATCH, STUDENT_DIM), _array(20, BATCH, TEACHER_DIM)
    loss = PKTLoss(PKTLoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()

    def conditional(x: np.ndarray) -> np.ndarray:
        unit = _row_normalise(x)
        kernel = _without_diagonal((1.0 + unit @ unit.T) / 2.0)
        return kernel / kernel.sum(axis=1, keepdims=True)

    expected = np.mean(_kl_rows(conditional(teacher), conditional(student)))

    assert expected > 0.01
    assert value == pytest.approx(expected, rel=1e-5)


def test_pkt_of_scaled_copy_is_zero() -> None:
    teacher = _array(21, BATCH, TEACHER_DIM)
    loss = PKTLoss(PKTLoss.Params(), student_dim=TEACHER_DIM, teacher_dim=TEACHER_DIM)

    value = loss(_inputs(3.0 * teacher, teacher)).item()

    assert value == pytest.approx(0.0, abs=1e-6)


# CRD


def test_crd_unrelated_embeddings_give_log_batch() -> None:
    # With temperature 1 and unit vectors in 128 dimensions, the logits of unrelated
    # embeddings have a standard deviation of about 1 / sqrt(128) = 0.09. The expected
    # loss then exceeds log B by about half their variance (0.004), and the batch mean of
    # the positive logits varies by about 0.09 / sqrt(64) = 0.011. A tolerance of 0.05
    # covers both with a margin of about four standard deviations.
    batch, width = 64, 128
    torch.manual_seed(0)
    params = CRDLoss.Params(embed_dim=width, temperature=1.0, memory_size=0)
    loss = CRDLoss(params, student_dim=width, teacher_dim=width)

    value = loss(_inputs(_array(22, batch, width), _array(23, batch, width))).item()

    assert abs(value - math.log(batch)) < 0.05


def test_crd_of_aligned_embeddings_is_below_log_batch() -> None:
    batch, width = 16, 8
    params = CRDLoss.Params(embed_dim=width, temperature=0.1, memory_size=0)
    loss = CRDLoss(params, student_dim=width, teacher_dim=width)
    for head in (loss.student_head, loss.teacher_head):
        _set_linear(head, np.eye(width), np.zeros(width))
    features = _array(24, batch, width)

    value = loss(_inputs(features, features)).item()

    assert value < 0.5 * math.log(batch)


def _reference_info_nce(
    student: np.ndarray,
    teacher: np.ndarray,
    bank: np.ndarray,
    temperature: float,
    *,
    skip_copies: bool = True,
) -> float:
    """Compute InfoNCE with identity heads.

    With skip_copies, copies of a row's own teacher features, other than its positive,
    are left out of its candidates.
    """
    candidates = np.concatenate([teacher, bank])
    student_unit, candidate_unit = _row_normalise(student), _row_normalise(candidates)
    total = 0.0
    for row in range(student.shape[0]):
        logits = []
        for column in range(candidates.shape[0]):
            is_copy = column != row and np.array_equal(candidates[column], teacher[row])
            if not (skip_copies and is_copy):
                logits.append(student_unit[row] @ candidate_unit[column] / temperature)
        positive = student_unit[row] @ candidate_unit[row] / temperature
        total += logsumexp(logits) - positive
    return total / student.shape[0]


def test_crd_memory_bank_matches_numpy_and_skips_copies() -> None:
    width, temperature = 4, 0.5
    params = CRDLoss.Params(embed_dim=width, temperature=temperature, memory_size=3)
    loss = CRDLoss(params, student_dim=width, teacher_dim=width)
    for head in (loss.student_head, loss.teacher_head):
        _set_linear(head, np.eye(width), np.zeros(width))
    # Rounded to float32, so that the repeated row is bitwise equal to the stored one.
    first_teacher = _array(25, 2, width).astype(np.float32).astype(np.float64)
    second_teacher = np.concatenate([first_teacher[1:], _array(26, 2, width)])
    second_teacher = second_teacher.astype(np.float32).astype(np.float64)
    first_student, second_student = _array(27, 2, width), _array(28, 3, width)

    first_value = loss(_inputs(first_student, first_teacher)).item()
    second_value = loss(_inputs(second_student, second_teacher)).item()

    no_bank = np.zeros((0, width))
    expected_first = _reference_info_nce(first_student, first_teacher, no_bank, temperature)
    expected_second = _reference_info_nce(second_student, second_teacher, first_teacher, temperature)
    copy_as_negative = _reference_info_nce(
        second_student, second_teacher, first_teacher, temperature, skip_copies=False
    )
    assert first_value == pytest.approx(expected_first, rel=1e-5)
    assert second_value == pytest.approx(expected_second, rel=1e-5)
    # Row 0 of the second batch repeats a bank row, which must not count as its negative.
    assert abs(copy_as_negative - expected_second) > 0.01

    # Five rows went into a bank of three, oldest out first: slots 2, 0, 1 hold the second batch.
    expected_bank = np.stack([second_teacher[1], second_teacher[2], second_teacher[0]])
    np.testing.assert_array_equal(loss.memory.numpy(), expected_bank.astype(np.float32))
    assert int(loss.memory_filled) == 3


def test_crd_eval_mode_reads_but_keeps_bank() -> None:
    torch.manual_seed(0)
    loss = CRDLoss(CRDLoss.Params(memory_size=8), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    loss(_random_inputs(seed=29))
    bank = loss.memory.clone()

    loss.eval()
    loss(_random_inputs(seed=30))

    assert int(loss.memory_filled) == BATCH
    assert torch.equal(loss.memory, bank)


# DKD


def _reference_decoupled(
    student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-row TCKD, NCKD, classical KL and teacher target probability, from the definitions."""
    student_probs = softmax(student / temperature, axis=1)
    teacher_probs = softmax(teacher / temperature, axis=1)
    rows = np.arange(len(labels))
    student_target, teacher_target = student_probs[rows, labels], teacher_probs[rows, labels]
    tckd = teacher_target * np.log(teacher_target / student_target) + (1 - teacher_target) * np.log(
        (1 - teacher_target) / (1 - student_target)
    )
    others = np.ones_like(student_probs, dtype=bool)
    others[rows, labels] = False
    student_rest = student_probs[others].reshape(len(labels), -1)
    teacher_rest = teacher_probs[others].reshape(len(labels), -1)
    student_rest /= student_rest.sum(axis=1, keepdims=True)
    teacher_rest /= teacher_rest.sum(axis=1, keepdims=True)
    nckd = _kl_rows(teacher_rest, student_rest)
    classical = _kl_rows(teacher_probs, student_probs)
    return tckd, nckd, classical, teacher_target


DKD_STUDENT = np.array(
    [[1.0, -0.5, 2.0, 0.3], [0.3, 0.1, -1.2, 2.2], [-1.0, 0.0, 0.5, 0.4]]
)
DKD_TEACHER = np.array(
    [[2.5, 0.0, -1.0, 0.7], [-0.7, 1.4, 0.2, 3.0], [0.2, -2.0, 1.5, 1.0]]
)
DKD_LABELS = np.array([0, 3, 2])


def test_dkd_terms_recombine_into_classical_kl() -> None:
    temperature, warmup_steps = 2.0, 3
    params = DKDLoss.Params(alpha=1.0, beta=1.0, temperature=temperature, warmup_steps=warmup_steps)
    loss = DKDLoss(params, student_dim=1, teacher_dim=1)
    inputs = _inputs(
        np.zeros((3, 1)),
        np.zeros((3, 1)),
        student_logits=DKD_STUDENT,
        teacher_logits=DKD_TEACHER,
        labels=DKD_LABELS,
    )

    for _ in range(warmup_steps):
        value = loss(inputs).item()
    tckd, nckd = (term.detach().numpy() for term in loss.decoupled_terms(inputs))
    expected_tckd, expected_nckd, classical, teacher_target = _reference_decoupled(
        DKD_STUDENT, DKD_TEACHER, DKD_LABELS, temperature
    )

    np.testing.assert_allclose(tckd, expected_tckd, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(nckd, expected_nckd, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(classical, tckd + (1 - teacher_target) * nckd, rtol=1e-4)
    # The identity holds for the references alone, to float64 precision.
    np.testing.assert_allclose(classical, expected_tckd + (1 - teacher_target) * expected_nckd, rtol=1e-12)
    assert int(loss.steps_done) == warmup_steps
    assert value == pytest.approx(
        temperature**2 * np.mean(expected_tckd + expected_nckd), rel=1e-5
    )


def test_dkd_weights_terms_by_alpha_and_beta() -> None:
    params = DKDLoss.Params(alpha=0.5, beta=8.0, temperature=4.0)
    loss = DKDLoss(params, student_dim=1, teacher_dim=1)
    inputs = _inputs(
        np.zeros((3, 1)),
        np.zeros((3, 1)),
        student_logits=DKD_STUDENT,
        teacher_logits=DKD_TEACHER,
        labels=DKD_LABELS,
    )

    value = loss(inputs).item()
    tckd, nckd, _, _ = _reference_decoupled(DKD_STUDENT, DKD_TEACHER, DKD_LABELS, 4.0)

    assert value == pytest.approx(16.0 * (0.5 * tckd.mean() + 8.0 * nckd.mean()), rel=1e-5)


def test_dkd_warmup_ramps_linearly_in_training_only() -> None:
    loss = DKDLoss(DKDLoss.Params(warmup_steps=4), student_dim=1, teacher_dim=1)
    inputs = _inputs(
        np.zeros((3, 1)),
        np.zeros((3, 1)),
        student_logits=DKD_STUDENT,
        teacher_logits=DKD_TEACHER,
        labels=DKD_LABELS,
    )
    loss.eval()
    full = loss(inputs).item()
    assert int(loss.steps_done) == 0

    loss.train()
    values = [loss(inputs).item() for _ in range(6)]

    expected = [full * factor for factor in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]
    assert values == pytest.approx(expected, rel=1e-6)
    assert int(loss.steps_done) == 6


def test_dkd_rejects_label_out_of_range() -> None:
    loss = DKDLoss(DKDLoss.Params(), student_dim=1, teacher_dim=1)
    inputs = _inputs(
        np.zeros((3, 1)),
        np.zeros((3, 1)),
        student_logits=DKD_STUDENT,
        teacher_logits=DKD_TEACHER,
        labels=np.array([0, 4, 1]),
    )

    with pytest.raises(
        ValueError, match=r"labels from 0 to 4, but with 4 classes each label must be in 0 \.\. 3"
    ):
        loss(inputs)


def test_dkd_rejects_mismatched_logits() -> None:
    loss = DKDLoss(DKDLoss.Params(), student_dim=1, teacher_dim=1)
    inputs = _inputs(
        np.zeros((3, 1)),
        np.zeros((3, 1)),
        student_logits=DKD_STUDENT,
        teacher_logits=DKD_TEACHER[:, :3],
        labels=DKD_LABELS,
    )

    with pytest.raises(ValueError, match=r"same \(batch, classes\) shape .* got \(3, 4\) and \(3, 3\)"):
        loss(inputs)


# CKA


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    numerator = np.linalg.norm(y.T @ x, "fro") ** 2
    return numerator / (np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro"))


def test_cka_matches_numpy_feature_space_formula() -> None:
    student, teacher = _array(31, 8, STUDENT_DIM), _array(32, 8, TEACHER_DIM)
    loss = CKALoss(CKALoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()
    expected = 1.0 - _reference_cka(student, teacher)

    assert expected > 0.05
    assert value == pytest.approx(expected, rel=1e-5)


def test_cka_is_invariant_to_rotation_and_scale() -> None:
    student, teacher = _array(33, 8, STUDENT_DIM), _array(34, 8, TEACHER_DIM)
    student_rotation, _ = np.linalg.qr(_array(35, STUDENT_DIM, STUDENT_DIM))
    teacher_rotation, _ = np.linalg.qr(_array(36, TEACHER_DIM, TEACHER_DIM))
    # Orthonormal rows: a 6-wide student mapped into 10 dimensions keeps its Gram matrix.
    embedding, _ = np.linalg.qr(_array(37, TEACHER_DIM, STUDENT_DIM))
    loss = CKALoss(CKALoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    same_width = CKALoss(CKALoss.Params(), student_dim=STUDENT_DIM, teacher_dim=STUDENT_DIM)

    base = loss(_inputs(student, teacher)).item()
    student_changed = loss(_inputs(0.01 * student @ student_rotation, teacher)).item()
    teacher_changed = loss(_inputs(student, 30.0 * teacher @ teacher_rotation)).item()
    rotated_copy = same_width(_inputs(student, 4.0 * student @ student_rotation)).item()
    embedded_copy = loss(_inputs(student, 0.5 * student @ embedding.T)).item()

    assert student_changed == pytest.approx(base, rel=1e-5)
    assert teacher_changed == pytest.approx(base, rel=1e-5)
    assert rotated_copy == pytest.approx(0.0, abs=1e-5)
    assert embedded_copy == pytest.approx(0.0, abs=1e-5)


def test_cka_of_constant_features_is_one() -> None:
    # Centring leaves a zero Gram matrix, so CKA is 0 rather than undefined.
    student = np.tile(_array(41, 1, STUDENT_DIM), (BATCH, 1))
    loss = CKALoss(CKALoss.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    inputs = _inputs(student, _array(42, BATCH, TEACHER_DIM))
    inputs.student_features.requires_grad_()

    value = loss(inputs)
    value.backward()

    assert value.item() == 1.0
    assert torch.isfinite(inputs.student_features.grad).all()


# CLIP-KD


def test_clip_kd_matches_numpy() -> None:
    torch.manual_seed(0)
    temperature = 0.5
    params = CLIPKDLoss.Params(feature_weight=0.7, relation_weight=1.3, temperature=temperature)
    loss = CLIPKDLoss(params, student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    student, teacher = _array(38, BATCH, STUDENT_DIM), _array(39, BATCH, TEACHER_DIM)

    value = loss(_inputs(student, teacher)).item()
    weight, bias = _weights(loss.projection)
    feature = np.mean((student @ weight.T + bias - teacher) ** 2)

    def relations(x: np.ndarray) -> np.ndarray:
        unit = _row_normalise(x)
        return softmax(_without_diagonal(unit @ unit.T) / temperature, axis=1)

    relation = np.mean(_kl_rows(relations(teacher), relations(student)))

    assert relation > 0.01
    assert value == pytest.approx(0.7 * feature + 1.3 * relation, rel=1e-5)


def test_clip_kd_relation_ignores_student_scale() -> None:
    teacher = _array(40, BATCH, TEACHER_DIM)
    params = CLIPKDLoss.Params(feature_weight=0.0, projection=False)
    loss = CLIPKDLoss(params, student_dim=TEACHER_DIM, teacher_dim=TEACHER_DIM)

    value = loss(_inputs(2.0 * teacher, teacher)).item()

    assert value == pytest.approx(0.0, abs=1e-5)
