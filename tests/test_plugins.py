"""Tests of the built-in fusion and loss plugins and of the registry that finds them.

Loss values are checked against references written with plain Python loops and the
`math` module, so they share no code with the torch implementations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pytest
import torch
from pydantic import ValidationError

from mmkd.errors import DuplicatePluginError, PluginLoadError, UnknownPluginError
from mmkd.plugin_api import (
    PLUGIN_API_VERSION,
    DistillationInputs,
    FusionPlugin,
    LossPlugin,
    PluginParams,
)
from mmkd.plugins.fusion import AttentionFusion, ConcatFusion
from mmkd.plugins.feature_losses import FeatureMSELoss
from mmkd.plugins.losses import HintonLoss, KLDivergenceLoss
from mmkd.registry import Registry, get_registry

INPUT_DIMS = (5, 7, 3)
# Rows: all present, each modality missing once, and one row with no modality at all.
MASK = torch.tensor(
    [
        [True, True, True],
        [True, False, True],
        [False, True, True],
        [True, True, False],
        [False, False, False],
    ]
)
STUDENT_DIM = 6
TEACHER_DIM = 10
NUM_CLASSES = 4
# TCA and CORAL work within one feature space, so they get equal widths.
SAME_WIDTH_ALIGNMENT = {"tca", "coral"}


def _features(seed: int, batch: int = MASK.shape[0]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=generator) for dim in INPUT_DIMS]


def _softmax(row: Sequence[float], temperature: float) -> list[float]:
    exps = [math.exp(value / temperature) for value in row]
    total = sum(exps)
    return [value / total for value in exps]


def _reference_kl(
    target_rows: Sequence[Sequence[float]],
    input_rows: Sequence[Sequence[float]],
    temperature: float,
) -> float:
    """KL(target || input) of tempered softmaxes, summed over classes, averaged over rows."""
    total = 0.0
    for target_row, input_row in zip(target_rows, input_rows):
        target = _softmax(target_row, temperature)
        predicted = _softmax(input_row, temperature)
        for p, q in zip(target, predicted):
            total += p * math.log(p / q)
    return total / len(target_rows)


def _reference_cross_entropy(rows: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    total = 0.0
    for row, label in zip(rows, labels):
        total -= math.log(_softmax(row, 1.0)[label])
    return total / len(rows)


def _reference_mse(
    predicted: Sequence[Sequence[float]], target: Sequence[Sequence[float]]
) -> float:
    squares = []
    for predicted_row, target_row in zip(predicted, target):
        for p, t in zip(predicted_row, target_row):
            squares.append((p - t) ** 2)
    return sum(squares) / len(squares)


def _logit_inputs(
    student: list[list[float]], teacher: list[list[float]], labels: list[int] | None = None
) -> DistillationInputs:
    batch = len(student)
    return DistillationInputs(
        student_logits=torch.tensor(student),
        teacher_logits=torch.tensor(teacher),
        student_features=torch.zeros(batch, STUDENT_DIM),
        teacher_features=torch.zeros(batch, TEACHER_DIM),
        labels=torch.tensor(labels if labels is not None else [0] * batch),
    )


def _feature_inputs(student: list[list[float]], teacher: list[list[float]]) -> DistillationInputs:
    batch = len(student)
    return DistillationInputs(
        student_logits=torch.zeros(batch, NUM_CLASSES),
        teacher_logits=torch.zeros(batch, NUM_CLASSES),
        student_features=torch.tensor(student),
        teacher_features=torch.tensor(teacher),
        labels=torch.zeros(batch, dtype=torch.long),
    )


# Fusion plugins


@pytest.mark.parametrize("name", get_registry("fusion").names())
def test_fusion_plugin_meets_contract(name: str) -> None:
    torch.manual_seed(0)
    plugin_class = get_registry("fusion").get(name)
    plugin = plugin_class(INPUT_DIMS, plugin_class.Params())
    batch = MASK.shape[0]

    # Training mode, so dropout is active.
    train_output = plugin(_features(seed=1), MASK)
    assert train_output.shape == (batch, plugin.output_dim)
    assert torch.isfinite(train_output).all()

    # Gradients: a fixed random weighting, because a plain sum of a LayerNorm output has
    # zero gradient.
    plugin.eval()
    features = [tensor.requires_grad_() for tensor in _features(seed=1)]
    output = plugin(features, MASK)
    weighting = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
    (output * weighting).sum().backward()
    for param_name, param in plugin.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} got an all-zero gradient"
    for index, tensor in enumerate(features):
        assert tensor.grad is not None
        row_has_gradient = tensor.grad.abs().sum(dim=1) > 0
        assert torch.equal(row_has_gradient, MASK[:, index]), f"modality {index}"

    # Masks: changing a missing modality changes nothing, changing a present one does.
    output = output.detach()
    for index in range(len(INPUT_DIMS)):
        noise = 100.0 * torch.randn(batch, INPUT_DIMS[index])
        missing = ~MASK[:, index].unsqueeze(1)

        changed_missing = _features(seed=1)
        changed_missing[index] = changed_missing[index] + noise * missing
        with torch.no_grad():
            unchanged = plugin(changed_missing, MASK)
        torch.testing.assert_close(unchanged, output, rtol=0.0, atol=1e-6)

        changed_present = _features(seed=1)
        changed_present[index] = changed_present[index] + noise * ~missing
        with torch.no_grad():
            changed = plugin(changed_present, MASK)
        row_changed = (changed - output).abs().amax(dim=1) > 1e-4
        assert torch.equal(row_changed, MASK[:, index]), f"modality {index}"

    # A NaN placeholder where a modality is missing must not reach the output either.
    nan_missing = _features(seed=1)
    for index, tensor in enumerate(nan_missing):
        tensor[~MASK[:, index]] = float("nan")
    with torch.no_grad():
        nan_output = plugin(nan_missing, MASK)
    torch.testing.assert_close(nan_output, output, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("name", get_registry("fusion").names())
def test_fusion_rejects_wrong_number_of_modalities(name: str) -> None:
    plugin_class = get_registry("fusion").get(name)
    plugin = plugin_class(INPUT_DIMS, plugin_class.Params())

    with pytest.raises(ValueError, match=r"expected 3 modality tensors .* got 2"):
        plugin(_features(seed=1)[:2], MASK)


def test_concat_fusion_zeroes_missing_modalities() -> None:
    plugin = ConcatFusion([2, 1], ConcatFusion.Params())
    features = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0], [6.0]])]
    mask = torch.tensor([[True, False], [False, True]])

    output = plugin(features, mask)

    assert plugin.output_dim == 3
    assert output.tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 6.0]]


def test_attention_fusion_stores_weights_without_missing_keys() -> None:
    torch.manual_seed(0)
    params = AttentionFusion.Params(dim=16, heads=2, layers=2, dropout=0.0)
    plugin = AttentionFusion(INPUT_DIMS, params)

    plugin(_features(seed=1), MASK)
    weights = plugin.attention_weights

    assert weights is not None
    assert weights.shape == (MASK.shape[0], 2, 3, 3)
    assert not weights.requires_grad
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(MASK.shape[0], 2, 3))
    rows_with_modalities = MASK.any(dim=1)
    key_missing = ~MASK[:, None, None, :].expand_as(weights)
    weights_on_missing = weights[rows_with_modalities][key_missing[rows_with_modalities]]
    assert weights_on_missing.numel() > 0
    assert torch.all(weights_on_missing == 0.0)


def test_attention_ignores_missing_modality_tokens() -> None:
    # Missing features are zeroed before projection, so the generic mask check cannot
    # tell whether attention and pooling skip a missing token. The token still carries
    # its modality embedding, so changing that embedding shows any leak.
    torch.manual_seed(0)
    plugin = AttentionFusion(INPUT_DIMS, AttentionFusion.Params(dim=16, heads=2)).eval()
    features = _features(seed=1)
    original = plugin.modality_embedding.detach().clone()
    # Random, not constant: LayerNorm would remove a shift that is equal in every channel.
    shift = torch.randn(16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = plugin(features, MASK)
        for index in range(len(INPUT_DIMS)):
            plugin.modality_embedding[index] += shift
            after = plugin(features, MASK)
            plugin.modality_embedding.copy_(original)

            row_changed = (after - before).abs().amax(dim=1) > 1e-4
            assert torch.equal(row_changed, MASK[:, index]), f"modality {index}"


def test_attention_fusion_row_without_modalities_is_zero() -> None:
    torch.manual_seed(0)
    plugin = AttentionFusion(INPUT_DIMS, AttentionFusion.Params(dim=8, heads=2))
    features = [tensor.requires_grad_() for tensor in _features(seed=1)]

    output = plugin(features, MASK)
    output.pow(2).sum().backward()

    assert torch.equal(output[4], torch.zeros(8))
    for param in plugin.parameters():
        assert param.grad is not None
        assert torch.isfinite(param.grad).all()


def test_attention_dim_not_divisible_by_heads_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"dim 130 is not divisible by heads 4"):
        AttentionFusion.Params(dim=130, heads=4)


# Loss plugins


@pytest.mark.parametrize("name", get_registry("losses").names())
def test_loss_plugin_meets_contract(name: str) -> None:
    torch.manual_seed(0)
    plugin_class = get_registry("losses").get(name)
    plugin = plugin_class(plugin_class.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)
    generator = torch.Generator().manual_seed(3)
    inputs = DistillationInputs(
        student_logits=torch.randn(5, NUM_CLASSES, generator=generator).requires_grad_(),
        teacher_logits=torch.randn(5, NUM_CLASSES, generator=generator).requires_grad_(),
        student_features=torch.randn(5, STUDENT_DIM, generator=generator).requires_grad_(),
        teacher_features=torch.randn(5, TEACHER_DIM, generator=generator).requires_grad_(),
        labels=torch.tensor([0, 1, 2, 3, 1]),
    )

    loss = plugin(inputs)
    loss.backward()

    assert loss.dim() == 0
    assert torch.isfinite(loss)
    student_grads = [
        tensor.grad for tensor in (inputs.student_logits, inputs.student_features)
    ]
    assert any(grad is not None and grad.abs().sum() > 0 for grad in student_grads)
    assert inputs.teacher_logits.grad is None
    assert inputs.teacher_features.grad is None
    for param_name, param in plugin.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} got an all-zero gradient"


@pytest.mark.parametrize("name", get_registry("alignment").names())
def test_alignment_plugin_meets_contract(name: str) -> None:
    torch.manual_seed(0)
    plugin_class = get_registry("alignment").get(name)
    source_dim = TEACHER_DIM if name in SAME_WIDTH_ALIGNMENT else STUDENT_DIM
    plugin = plugin_class(plugin_class.Params(), source_dim=source_dim, target_dim=TEACHER_DIM)
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(12, source_dim, generator=generator).requires_grad_()
    target = torch.randn(12, TEACHER_DIM, generator=generator).requires_grad_()

    loss = plugin(source, target)
    loss.backward()

    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert source.grad is not None and source.grad.abs().sum() > 0
    assert target.grad is None
    for param_name, param in plugin.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} got an all-zero gradient"


def test_kl_golden_value_matches_hand_computation() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4] and softmax([0, 0]) = [1/2, 1/2], so
    # KL = 0.25 * ln(0.25 / 0.5) + 0.75 * ln(0.75 / 0.5)
    #    = -0.25 * 0.69314718056 + 0.75 * 0.40546510811 = 0.13081203594.
    loss = KLDivergenceLoss(KLDivergenceLoss.Params(temperature=1.0), student_dim=1, teacher_dim=1)

    value = loss(_logit_inputs(student=[[0.0, 0.0]], teacher=[[0.0, math.log(3.0)]])).item()

    assert value == pytest.approx(0.13081203594, abs=1e-6)


def test_kl_uses_teacher_as_target_distribution() -> None:
    student, teacher = [[0.0, 0.0]], [[0.0, math.log(3.0)]]
    teacher_to_student = _reference_kl(teacher, student, temperature=1.0)
    student_to_teacher = _reference_kl(student, teacher, temperature=1.0)
    loss = KLDivergenceLoss(KLDivergenceLoss.Params(temperature=1.0), student_dim=1, teacher_dim=1)

    value = loss(_logit_inputs(student=student, teacher=teacher)).item()

    assert abs(teacher_to_student - student_to_teacher) > 0.01
    assert value == pytest.approx(teacher_to_student, rel=1e-5)
    assert value != pytest.approx(student_to_teacher, rel=1e-2)


def test_kl_sums_classes_and_averages_batch() -> None:
    student = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
    teacher = [[2.5, 0.0, -1.0], [-0.7, 1.4, 0.2]]
    params = KLDivergenceLoss.Params(temperature=2.0, scale_by_t_squared=False)
    loss = KLDivergenceLoss(params, student_dim=1, teacher_dim=1)

    value = loss(_logit_inputs(student=student, teacher=teacher)).item()
    expected = _reference_kl(teacher, student, temperature=2.0)
    elementwise_mean = expected * len(teacher) / (len(teacher) * len(teacher[0]))

    assert value == pytest.approx(expected, rel=1e-5)
    assert value != pytest.approx(elementwise_mean, rel=1e-2)


def test_kl_scale_multiplies_by_temperature_squared() -> None:
    inputs = _logit_inputs(student=[[1.0, -0.5, 2.0]], teacher=[[2.5, 0.0, -1.0]])
    scaled = KLDivergenceLoss(
        KLDivergenceLoss.Params(temperature=3.0, scale_by_t_squared=True),
        student_dim=1,
        teacher_dim=1,
    )
    unscaled = KLDivergenceLoss(
        KLDivergenceLoss.Params(temperature=3.0, scale_by_t_squared=False),
        student_dim=1,
        teacher_dim=1,
    )

    scaled_value = scaled(inputs).item()
    unscaled_value = unscaled(inputs).item()

    assert unscaled_value > 0.0
    assert scaled_value == pytest.approx(9.0 * unscaled_value, rel=1e-6)
    expected = 9.0 * _reference_kl([[2.5, 0.0, -1.0]], [[1.0, -0.5, 2.0]], temperature=3.0)
    assert scaled_value == pytest.approx(expected, rel=1e-5)


def test_kl_of_identical_logits_is_zero() -> None:
    logits = [[0.4, -2.0, 3.1], [1.0, 1.0, 1.0]]
    loss = KLDivergenceLoss(KLDivergenceLoss.Params(), student_dim=1, teacher_dim=1)

    value = loss(_logit_inputs(student=logits, teacher=logits)).item()

    assert value == pytest.approx(0.0, abs=1e-7)


def test_hinton_matches_independent_formula() -> None:
    student = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
    teacher = [[2.5, 0.0, -1.0], [-0.7, 1.4, 0.2]]
    labels = [2, 0]
    loss = HintonLoss(HintonLoss.Params(temperature=2.0, alpha=0.7), student_dim=1, teacher_dim=1)

    value = loss(_logit_inputs(student=student, teacher=teacher, labels=labels)).item()
    soft = _reference_kl(teacher, student, temperature=2.0)
    hard = _reference_cross_entropy(student, labels)

    assert value == pytest.approx(0.7 * 4.0 * soft + 0.3 * hard, rel=1e-5)


def test_hinton_with_alpha_zero_is_cross_entropy() -> None:
    student = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
    teacher = [[2.5, 0.0, -1.0], [-0.7, 1.4, 0.2]]
    labels = [1, 0]
    loss = HintonLoss(HintonLoss.Params(temperature=4.0, alpha=0.0), student_dim=1, teacher_dim=1)

    value = loss(_logit_inputs(student=student, teacher=teacher, labels=labels)).item()

    assert value == pytest.approx(_reference_cross_entropy(student, labels), rel=1e-5)


def test_hinton_with_alpha_one_ignores_labels() -> None:
    student = [[1.0, -0.5, 2.0]]
    teacher = [[2.5, 0.0, -1.0]]
    loss = HintonLoss(HintonLoss.Params(temperature=2.0, alpha=1.0), student_dim=1, teacher_dim=1)

    first = loss(_logit_inputs(student=student, teacher=teacher, labels=[0])).item()
    second = loss(_logit_inputs(student=student, teacher=teacher, labels=[2])).item()

    assert first == second
    assert first == pytest.approx(4.0 * _reference_kl(teacher, student, 2.0), rel=1e-5)


def test_mse_identity_projection_matches_hand_value() -> None:
    student = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]
    teacher = [[0.0, 2.0, 5.0], [1.0, 1.0, -1.0]]
    loss = FeatureMSELoss(FeatureMSELoss.Params(), student_dim=3, teacher_dim=3)
    with torch.no_grad():
        loss.projection.weight.copy_(torch.eye(3))
        loss.projection.bias.zero_()

    value = loss(_feature_inputs(student, teacher)).item()

    # Squared differences: 1, 0, 4, 4, 0.25, 1, so the mean is 10.25 / 6.
    assert value == pytest.approx(10.25 / 6.0, rel=1e-6)
    assert value == pytest.approx(_reference_mse(student, teacher), rel=1e-6)


def test_mse_projection_maps_student_to_teacher_width() -> None:
    student = [[1.0, 2.0], [-3.0, 0.5]]
    teacher = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]
    weight = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    bias = [0.5, 0.0, 0.0]
    loss = FeatureMSELoss(FeatureMSELoss.Params(), student_dim=2, teacher_dim=3)
    with torch.no_grad():
        loss.projection.weight.copy_(torch.tensor(weight))
        loss.projection.bias.copy_(torch.tensor(bias))

    value = loss(_feature_inputs(student, teacher)).item()
    projected = [
        [sum(w * s for w, s in zip(weight_row, row)) + b for weight_row, b in zip(weight, bias)]
        for row in student
    ]

    assert value == pytest.approx(_reference_mse(projected, teacher), rel=1e-6)


def test_mse_normalize_compares_unit_vectors() -> None:
    student = [[3.0, 4.0], [1.0, 0.0]]
    teacher = [[6.0, 8.0], [0.0, 2.0]]
    params = FeatureMSELoss.Params(projection=False, normalize=True)
    loss = FeatureMSELoss(params, student_dim=2, teacher_dim=2)

    value = loss(_feature_inputs(student, teacher)).item()

    # Row 0 has the same direction in both. Row 1 compares (1, 0) with (0, 1).
    assert value == pytest.approx(2.0 / 4.0, abs=1e-6)
    assert list(loss.parameters()) == []


def test_mse_without_projection_rejects_unequal_dims() -> None:
    params = FeatureMSELoss.Params(projection=False)

    with pytest.raises(ValueError, match=r"student_dim is 6 and teacher_dim is 10"):
        FeatureMSELoss(params, student_dim=6, teacher_dim=10)


# Parameter models


@pytest.mark.parametrize(
    ("plugin_class", "options", "field"),
    [
        (KLDivergenceLoss, {"temprature": 2.0}, "temprature"),
        (KLDivergenceLoss, {"temperature": 0.0}, "temperature"),
        (HintonLoss, {"alpha": 1.5}, "alpha"),
        (HintonLoss, {"alpha": -0.1}, "alpha"),
        (FeatureMSELoss, {"normalise": True}, "normalise"),
        (ConcatFusion, {"dropout": 1.0}, "dropout"),
        (AttentionFusion, {"heads": 0}, "heads"),
        (AttentionFusion, {"dim": 128, "head": 4}, "head"),
    ],
)
def test_params_reject_invalid_options(
    plugin_class: type[FusionPlugin | LossPlugin], options: dict[str, object], field: str
) -> None:
    params_class: type[PluginParams] = plugin_class.Params

    with pytest.raises(ValidationError, match=rf"(?m)^{field}\n"):
        params_class(**options)


# Registry


def test_entry_points_resolve_to_builtin_classes() -> None:
    assert get_registry("fusion").get("concat") is ConcatFusion
    assert get_registry("fusion").get("attention") is AttentionFusion
    assert get_registry("losses").get("kl") is KLDivergenceLoss
    assert get_registry("losses").get("hinton") is HintonLoss
    assert get_registry("losses").get("mse") is FeatureMSELoss


def test_unknown_loss_name_lists_available_plugins() -> None:
    registry = get_registry("losses")
    available = ", ".join(registry.names())

    with pytest.raises(UnknownPluginError, match=re.escape(f"Available: {available}.")) as info:
        registry.get("hintn")

    assert {"hinton", "kl", "mse"} <= set(registry.names())
    assert "Did you mean 'hinton'?" in str(info.value)


def test_duplicate_loss_name_names_both_sources() -> None:
    registry: Registry[type[LossPlugin]] = Registry("losses", "mmkd.losses")
    registry.load_entry_points()

    with pytest.raises(
        DuplicatePluginError,
        match=r"mmkd\.plugins\.losses:HintonLoss \(distribution mmkd\) and tests\.copy_of_hinton",
    ):
        registry.register("hinton", HintonLoss, source="tests.copy_of_hinton")


def test_duplicate_registered_before_scan_fails_at_scan() -> None:
    registry: Registry[type[LossPlugin]] = Registry("losses", "mmkd.losses")
    registry.register("kl", KLDivergenceLoss, source="tests.early_kl")

    with pytest.raises(
        DuplicatePluginError,
        match=r"tests\.early_kl and mmkd\.plugins\.losses:KLDivergenceLoss \(distribution mmkd\)",
    ):
        registry.names()


def _load_missing_backend() -> type[LossPlugin]:
    raise ImportError("No module named 'fancy_kd_backend'")


def test_broken_plugin_does_not_hide_other_plugins() -> None:
    registry: Registry[type[LossPlugin]] = Registry("losses", "mmkd.losses")
    registry.register_lazy("broken", _load_missing_backend, source="tests.broken_plugin")

    assert {"broken", "hinton", "kl", "mse"} <= set(registry.names())
    assert registry.get("kl") is KLDivergenceLoss
    for _ in range(2):  # raised on every use, not only the first
        with pytest.raises(PluginLoadError, match=r"'broken' from tests\.broken_plugin") as info:
            registry.get("broken")
        message = str(info.value)
        assert "Traceback (most recent call last)" in message
        assert "in _load_missing_backend" in message
        assert "ImportError: No module named 'fancy_kd_backend'" in message
    assert registry.get("hinton") is HintonLoss


class _FutureLoss(LossPlugin):
    plugin_api = 999


def test_plugin_for_other_api_version_is_rejected() -> None:
    registry: Registry[type[LossPlugin]] = Registry("losses", "mmkd.losses")
    registry.register_lazy("future", lambda: _FutureLoss, source="tests.future_plugin")

    with pytest.raises(
        PluginLoadError,
        match=rf"API version 999, but this mmkd provides version {PLUGIN_API_VERSION}",
    ):
        registry.get("future")
    assert registry.get("mse") is FeatureMSELoss


# Every registered plugin: determinism and bfloat16


def _build(kind: str, name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    plugin_class = get_registry(kind).get(name)
    if kind == "fusion":
        return plugin_class(INPUT_DIMS, plugin_class.Params())
    if kind == "alignment":
        source_dim = TEACHER_DIM if name in SAME_WIDTH_ALIGNMENT else STUDENT_DIM
        return plugin_class(plugin_class.Params(), source_dim=source_dim, target_dim=TEACHER_DIM)
    return plugin_class(plugin_class.Params(), student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM)


def _call(kind: str, plugin: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    if kind == "fusion":
        return plugin([tensor.to(dtype) for tensor in _features(seed=5)], MASK)
    source_dim = plugin.source_dim if kind == "alignment" else STUDENT_DIM
    student = torch.randn(8, source_dim, generator=generator).to(dtype)
    teacher = torch.randn(8, TEACHER_DIM, generator=generator).to(dtype)
    if kind == "alignment":
        return plugin(student, teacher)
    return plugin(DistillationInputs(
        student_logits=torch.randn(8, NUM_CLASSES, generator=generator).to(dtype),
        teacher_logits=torch.randn(8, NUM_CLASSES, generator=generator).to(dtype),
        student_features=student,
        teacher_features=teacher,
        labels=torch.arange(8) % NUM_CLASSES,
    ))


EVERY_PLUGIN = [(kind, name) for kind in ("fusion", "alignment", "losses") for name in get_registry(kind).names()]


@pytest.mark.parametrize(("kind", "name"), EVERY_PLUGIN, ids=[f"{k}-{n}" for k, n in EVERY_PLUGIN])
def test_plugin_same_seed_same_output(kind: str, name: str) -> None:
    first, second = _build(kind, name, seed=6).eval(), _build(kind, name, seed=6).eval()
    with torch.no_grad():
        torch.testing.assert_close(_call(kind, first, torch.float32), _call(kind, second, torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "name"), EVERY_PLUGIN, ids=[f"{k}-{n}" for k, n in EVERY_PLUGIN])
def test_plugin_runs_in_bfloat16(kind: str, name: str) -> None:
    plugin = _build(kind, name, seed=7).eval()
    with torch.no_grad():
        reference = _call(kind, plugin, torch.float32)
        output = _call(kind, plugin.to(torch.bfloat16), torch.bfloat16)
    assert output.dtype == torch.bfloat16
    assert output.shape == reference.shape
    assert torch.isfinite(output).all()
    # bfloat16 keeps 8 bits of mantissa: agree with float32 to a few percent of the scale.
    scale = reference.abs().max().clamp(min=1.0)
    assert (output.float() - reference).abs().max() <= 0.1 * scale


@pytest.mark.parametrize(("kind", "name"), EVERY_PLUGIN, ids=[f"{k}-{n}" for k, n in EVERY_PLUGIN])
def test_plugin_yaml_example_is_a_valid_config(kind: str, name: str, tmp_path) -> None:
    import inspect

    import yaml

    from mmkd.config import config_from_dict

    doc = inspect.cleandoc(get_registry(kind).get(name).__doc__ or "")
    examples = re.findall(r"```yaml\n(.*?)```", doc, flags=re.DOTALL)
    assert examples, f"{name} has no YAML example"
    for example in examples:
        config = config_from_dict({"data": {"manifest": "m.csv"}, **yaml.safe_load(example)}, base_dir=tmp_path)
        section = config.student.fusion if kind == "fusion" else None
        named = [section.name] if section else [t.name for t in config.distill.losses + config.distill.alignment]
        assert name in named
