"""Tests of the built-in alignment plugins in mmkd.plugins.alignment.

Each plugin is checked against an independent computation written here with numpy and
scipy: eigenproblems, principal angles, matrix square roots, orthogonal Procrustes and
explicit loops. Every plugin also goes through one contract test: a finite scalar loss,
gradients for the source and every parameter, none for the target, and the same value
for the same seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from pydantic import ValidationError
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

from mmkd.plugin_api import AlignmentPlugin
from mmkd.plugins.alignment import (
    CAANAlignment,
    CCAAlignment,
    CLIPAlignment,
    CORALAlignment,
    DeepCCAAlignment,
    DeepCORALAlignment,
    ProcrustesAlignment,
    TCAAlignment,
)

BATCH = 16

# Case name, class, params, source shape after the batch, target shape after the batch.
# TCA and CORAL need equal widths, and CAAN also takes (batch, tokens, width) inputs.
CASES: list[tuple[str, type[AlignmentPlugin], dict[str, Any], tuple[int, ...], tuple[int, ...]]] = [
    ("tca_linear", TCAAlignment, {"components": 2}, (6,), (6,)),
    ("tca_rbf", TCAAlignment, {"kernel": "rbf", "components": 3}, (6,), (6,)),
    ("coral", CORALAlignment, {}, (6,), (6,)),
    ("deep_coral", DeepCORALAlignment, {}, (6,), (5,)),
    ("cca", CCAAlignment, {"components": 3}, (6,), (5,)),
    ("dcca", DeepCCAAlignment, {"dim": 4}, (6,), (5,)),
    ("clip", CLIPAlignment, {"dim": 8}, (6,), (5,)),
    ("procrustes", ProcrustesAlignment, {}, (6,), (5,)),
    ("caan_pooled", CAANAlignment, {"dim": 8}, (6,), (5,)),
    ("caan_tokens", CAANAlignment, {"dim": 8}, (3, 6), (4, 5)),
]


def _build(
    plugin_class: type[AlignmentPlugin], options: dict[str, Any], source_dim: int, target_dim: int
) -> AlignmentPlugin:
    params = plugin_class.Params(**options)
    return plugin_class(params, source_dim=source_dim, target_dim=target_dim)


def _normal(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _tensor(array: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(array, dtype=dtype)


def _weight(layer: torch.nn.Linear) -> np.ndarray:
    """Return the (in, out) matrix of a bias-free Linear layer, so that output = input @ matrix."""
    return layer.weight.detach().to(torch.float64).numpy().T


def _normalize_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def _shifted_domains(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return source and target samples that differ by a shift of 3 along the first axis."""
    scales = np.array([1.0, 2.0, 1.5, 0.5])
    source = _normal(seed, 40, 4) * scales + np.array([3.0, 0.0, 0.0, 0.0])
    target = _normal(seed + 1, 36, 4) * scales
    return source, target


# Contract


@pytest.mark.parametrize(
    ("plugin_class", "options", "source_shape", "target_shape"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_alignment_plugin_meets_contract(
    plugin_class: type[AlignmentPlugin],
    options: dict[str, Any],
    source_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
) -> None:
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(BATCH, *source_shape, generator=generator).requires_grad_()
    target = torch.randn(BATCH, *target_shape, generator=generator).requires_grad_()
    torch.manual_seed(0)
    plugin = _build(plugin_class, options, source_shape[-1], target_shape[-1])

    loss = plugin(source, target)
    loss.backward()

    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert source.grad is not None
    assert torch.isfinite(source.grad).all()
    assert source.grad.abs().sum() > 0
    assert target.grad is None
    for param_name, param in plugin.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} got a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} got an all-zero gradient"

    torch.manual_seed(0)
    rebuilt = _build(plugin_class, options, source_shape[-1], target_shape[-1])
    assert rebuilt(source, target).item() == loss.item()


@pytest.mark.parametrize(
    ("plugin_class", "options", "source_shape", "target_shape"),
    [case[1:] for case in CASES if case[1] is not CAANAlignment],
    ids=[case[0] for case in CASES if case[1] is not CAANAlignment],
)
def test_alignment_rejects_wrong_width(
    plugin_class: type[AlignmentPlugin],
    options: dict[str, Any],
    source_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
) -> None:
    plugin = _build(plugin_class, options, source_shape[-1], target_shape[-1])
    source = torch.randn(BATCH, source_shape[-1] + 1)
    target = torch.randn(BATCH, target_shape[-1])

    with pytest.raises(ValueError, match=rf"built for source_dim {source_shape[-1]} and target_dim"):
        plugin(source, target)


@pytest.mark.parametrize(
    "plugin_class",
    [CCAAlignment, DeepCCAAlignment, CLIPAlignment, ProcrustesAlignment, CAANAlignment],
)
def test_paired_alignment_rejects_unequal_batches(plugin_class: type[AlignmentPlugin]) -> None:
    plugin = plugin_class(plugin_class.Params(), source_dim=4, target_dim=3)

    with pytest.raises(ValueError, match=r"source has 8 rows and the target has 7"):
        plugin(torch.randn(8, 4), torch.randn(7, 3))


@pytest.mark.parametrize(
    ("plugin_class", "options"),
    [
        (TCAAlignment, {"components": 2}),
        (CORALAlignment, {}),
        (CCAAlignment, {}),
        (ProcrustesAlignment, {}),
    ],
)
def test_transform_before_fit_is_rejected(
    plugin_class: type[AlignmentPlugin], options: dict[str, Any]
) -> None:
    plugin = _build(plugin_class, options, 4, 4)

    with pytest.raises(RuntimeError, match=r"has not been fitted\. Call fit\(source, target\)"):
        plugin.transform(torch.randn(5, 4))


@pytest.mark.parametrize(
    ("plugin_class", "options"),
    [
        (TCAAlignment, {"kernel": "rbf", "components": 3}),
        (CORALAlignment, {}),
        (CCAAlignment, {"components": 2}),
        (ProcrustesAlignment, {"center": True}),
    ],
)
def test_fit_survives_state_dict_round_trip(
    plugin_class: type[AlignmentPlugin], options: dict[str, Any]
) -> None:
    source, target = _normal(0, 20, 4), _normal(1, 20, 4) + 1.0
    fitted = _build(plugin_class, options, 4, 4).fit(_tensor(source), _tensor(target))
    restored = _build(plugin_class, options, 4, 4)

    restored.load_state_dict(fitted.state_dict())
    new_rows = _tensor(_normal(2, 5, 4))

    assert set(restored.state_dict()) == set(fitted.state_dict())
    torch.testing.assert_close(restored.transform(new_rows), fitted.transform(new_rows), rtol=0.0, atol=0.0)


@pytest.mark.parametrize(
    ("plugin_class", "options"),
    [
        (TCAAlignment, {"components": 2}),
        (CORALAlignment, {}),
        (CCAAlignment, {}),
        (ProcrustesAlignment, {"center": True}),
    ],
)
def test_fitted_plugin_runs_in_bfloat16(
    plugin_class: type[AlignmentPlugin], options: dict[str, Any]
) -> None:
    source, target = _normal(0, 20, 4), _normal(1, 20, 4) + 1.0
    plugin = _build(plugin_class, options, 4, 4).fit(_tensor(source), _tensor(target))
    new_rows = _tensor(_normal(2, 5, 4), torch.float32)
    reference = plugin.transform(new_rows)

    plugin.to(torch.bfloat16)
    output = plugin.transform(new_rows.to(torch.bfloat16))

    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("plugin_class", [TCAAlignment, CORALAlignment])
def test_shared_space_methods_reject_unequal_widths(plugin_class: type[AlignmentPlugin]) -> None:
    with pytest.raises(ValueError, match=r"needs equal widths .* source_dim is 6 and target_dim is 5"):
        plugin_class(plugin_class.Params(), source_dim=6, target_dim=5)


@pytest.mark.parametrize(
    ("plugin_class", "options", "field"),
    [
        (TCAAlignment, {"kernel": "linear", "gamma": 0.5}, "gamma applies only to kernel rbf"),
        (TCAAlignment, {"mu": 0.0}, "mu"),
        (TCAAlignment, {"kernal": "rbf"}, "kernal"),
        (CORALAlignment, {"eps": -1.0}, "eps"),
        (CLIPAlignment, {"initial_temperature": 0.001}, "above max_logit_scale 100.0"),
        (CAANAlignment, {"margin": -0.1}, "margin"),
    ],
)
def test_alignment_params_reject_invalid_options(
    plugin_class: type[AlignmentPlugin], options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        plugin_class.Params(**options)


# TCA


def _tca_matrices(
    source: np.ndarray, target: np.ndarray, kernel: str, gamma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return K, L and H of the TCA paper for the union of the two samples."""
    samples = np.vstack([source, target])
    if kernel == "linear":
        kernel_matrix = samples @ samples.T
    else:
        kernel_matrix = np.exp(-gamma * cdist(samples, samples, "sqeuclidean"))
    rows = samples.shape[0]
    indicator = np.concatenate(
        [np.full(len(source), 1.0 / len(source)), np.full(len(target), -1.0 / len(target))]
    )
    centring = np.eye(rows) - np.ones((rows, rows)) / rows
    return kernel_matrix, np.outer(indicator, indicator), centring


@pytest.mark.parametrize(("kernel", "gamma"), [("linear", None), ("rbf", 0.1)])
def test_tca_components_solve_generalised_eigenproblem(kernel: str, gamma: float | None) -> None:
    source, target = _shifted_domains(seed=0)
    mu = 0.5
    plugin = TCAAlignment(
        TCAAlignment.Params(kernel=kernel, gamma=gamma, mu=mu, components=3), source_dim=4, target_dim=4
    )

    plugin.fit(_tensor(source), _tensor(target))
    weights = plugin.projection.numpy()
    eigenvalues = plugin.eigenvalues.numpy()
    kernel_matrix, mmd_matrix, centring = _tca_matrices(source, target, kernel, gamma or 0.0)
    scatter = kernel_matrix @ centring @ kernel_matrix
    discrepancy = kernel_matrix @ mmd_matrix @ kernel_matrix + mu * np.eye(len(kernel_matrix))
    operator = np.linalg.solve(discrepancy, scatter)
    expected_eigenvalues = scipy.linalg.eigh(scatter, discrepancy, eigvals_only=True)[::-1][:3]

    assert weights.shape == (76, 3)
    np.testing.assert_allclose(eigenvalues, expected_eigenvalues, rtol=1e-8)
    for index in range(3):
        column = weights[:, index]
        residual = operator @ column - eigenvalues[index] * column
        relative = np.linalg.norm(residual) / np.linalg.norm(eigenvalues[index] * column)
        assert relative < 1e-8, f"component {index} has residual {relative:.2e}"
    # The TCA constraint W^T K H K W = I of Pan et al. fixes the scale of each component.
    np.testing.assert_allclose(weights.T @ scatter @ weights, np.eye(3), atol=1e-8)


def _normalized_mean_gap(source: np.ndarray, target: np.ndarray) -> float:
    """Return the linear-kernel MMD^2, ||mean_s - mean_t||^2, divided by the pooled total variance."""
    gap = np.sum((source.mean(axis=0) - target.mean(axis=0)) ** 2)
    return float(gap / np.trace(np.atleast_2d(np.cov(np.vstack([source, target]), rowvar=False))))


@pytest.mark.parametrize(("kernel", "gamma"), [("linear", None), ("rbf", 0.1)])
def test_tca_shrinks_mmd_between_shifted_domains(kernel: str, gamma: float | None) -> None:
    source, target = _shifted_domains(seed=0)
    plugin = TCAAlignment(
        TCAAlignment.Params(kernel=kernel, gamma=gamma, components=2), source_dim=4, target_dim=4
    )

    plugin.fit(_tensor(source), _tensor(target))
    latent_source = plugin.transform(_tensor(source)).numpy()
    latent_target = plugin.transform(_tensor(target)).numpy()
    raw_gap = _normalized_mean_gap(source, target)
    latent_gap = _normalized_mean_gap(latent_source, latent_target)

    # The gaps are scaled by the total variance, so the comparison does not depend on the
    # scale of the latent space.
    assert raw_gap > 0.5
    assert latent_gap < 0.1 * raw_gap


def test_tca_transform_of_fitted_samples_equals_embedding() -> None:
    source, target = _shifted_domains(seed=2)
    plugin = TCAAlignment(TCAAlignment.Params(kernel="rbf", components=3), source_dim=4, target_dim=4)

    plugin.fit(_tensor(source), _tensor(target))
    transformed = plugin.transform(_tensor(np.vstack([source, target])))

    torch.testing.assert_close(transformed, plugin.embedding, rtol=0.0, atol=1e-10)


def test_tca_loss_matches_latent_mean_gap() -> None:
    source, target = _shifted_domains(seed=4)
    gamma = 0.2
    plugin = TCAAlignment(
        TCAAlignment.Params(kernel="rbf", gamma=gamma, components=2), source_dim=4, target_dim=4
    )
    plugin.fit(_tensor(source), _tensor(target))
    batch_source, batch_target = _normal(5, 7, 4), _normal(6, 9, 4)

    value = plugin(_tensor(batch_source), _tensor(batch_target)).item()
    samples = np.vstack([source, target])
    weights = plugin.projection.numpy()
    latent_source = np.exp(-gamma * cdist(batch_source, samples, "sqeuclidean")) @ weights
    latent_target = np.exp(-gamma * cdist(batch_target, samples, "sqeuclidean")) @ weights
    expected = np.sum((latent_source.mean(axis=0) - latent_target.mean(axis=0)) ** 2)

    assert value == pytest.approx(expected, rel=1e-10)


def test_tca_linear_kernel_rejects_too_many_components() -> None:
    with pytest.raises(ValueError, match=r"at most source_dim \(4\) informative components"):
        TCAAlignment(TCAAlignment.Params(components=5), source_dim=4, target_dim=4)


# CORAL


def _correlated_features(seed: int, rows: int, width: int) -> np.ndarray:
    """Return rows with a random full-rank covariance and a nonzero mean."""
    mixing = _normal(seed, width, width) + 2.0 * np.eye(width)
    return _normal(seed + 1, rows, width) @ mixing + _normal(seed + 2, width)


def test_coral_recoloured_covariance_equals_target_covariance() -> None:
    source = _correlated_features(seed=0, rows=200, width=5)
    target = _correlated_features(seed=10, rows=150, width=5)
    plugin = CORALAlignment(CORALAlignment.Params(eps=1e-9), source_dim=5, target_dim=5)

    plugin.fit(_tensor(source), _tensor(target))
    recoloured = plugin.transform(_tensor(source)).numpy()

    np.testing.assert_allclose(
        np.cov(recoloured, rowvar=False), np.cov(target, rowvar=False), rtol=0.0, atol=1e-6
    )
    np.testing.assert_allclose(recoloured.mean(axis=0), target.mean(axis=0), rtol=0.0, atol=1e-9)


def test_coral_map_matches_scipy_square_roots() -> None:
    source = _correlated_features(seed=1, rows=60, width=4)
    target = _correlated_features(seed=11, rows=80, width=4)
    plugin = CORALAlignment(CORALAlignment.Params(eps=1.0, recenter=False), source_dim=4, target_dim=4)

    plugin.fit(_tensor(source), _tensor(target))
    regularised_source = np.cov(source, rowvar=False) + np.eye(4)
    regularised_target = np.cov(target, rowvar=False) + np.eye(4)
    expected_map = np.linalg.inv(scipy.linalg.sqrtm(regularised_source)) @ scipy.linalg.sqrtm(
        regularised_target
    )
    coral_map = plugin.coral_map.numpy()

    np.testing.assert_allclose(coral_map, expected_map, rtol=0.0, atol=1e-9)
    np.testing.assert_allclose(
        coral_map.T @ regularised_source @ coral_map, regularised_target, rtol=0.0, atol=1e-9
    )
    np.testing.assert_allclose(
        plugin.transform(_tensor(target)).numpy(), target @ expected_map, rtol=0.0, atol=1e-9
    )


def _reference_coral_loss(source: np.ndarray, target: np.ndarray) -> float:
    difference = np.cov(source, rowvar=False) - np.cov(target, rowvar=False)
    return float(np.sum(difference**2) / (4.0 * target.shape[1] ** 2))


def test_deep_coral_matches_numpy_formula() -> None:
    source = _correlated_features(seed=2, rows=12, width=6)
    target = _correlated_features(seed=12, rows=9, width=4)
    torch.manual_seed(0)
    plugin = DeepCORALAlignment(DeepCORALAlignment.Params(), source_dim=6, target_dim=4)

    value = plugin(_tensor(source, torch.float32), _tensor(target, torch.float32)).item()
    expected = _reference_coral_loss(source @ _weight(plugin.projection), target)

    assert expected > 0.01
    assert value == pytest.approx(expected, rel=1e-4)


def test_coral_forward_matches_numpy_formula() -> None:
    source = _correlated_features(seed=3, rows=10, width=3)
    target = _correlated_features(seed=13, rows=14, width=3)
    plugin = CORALAlignment(CORALAlignment.Params(), source_dim=3, target_dim=3)

    value = plugin(_tensor(source), _tensor(target)).item()

    assert value == pytest.approx(_reference_coral_loss(source, target), rel=1e-10)


def test_deep_coral_of_equal_covariances_is_zero() -> None:
    # Covariance ignores the row order and a constant shift.
    source = _correlated_features(seed=4, rows=20, width=5)
    target = source[np.random.default_rng(0).permutation(20)] + 7.0
    plugin = DeepCORALAlignment(DeepCORALAlignment.Params(), source_dim=5, target_dim=5)

    value = plugin(_tensor(source), _tensor(target)).item()

    assert list(plugin.parameters()) == []
    assert value == pytest.approx(0.0, abs=1e-12)


# CCA


def _paired_views(seed: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a 4-wide and a 3-wide view that share two latent signals, plus noise."""
    latent = _normal(seed, rows, 2)
    source = latent @ _normal(seed + 1, 2, 4) + 0.5 * _normal(seed + 2, rows, 4) + 3.0
    target = latent @ _normal(seed + 3, 2, 3) + 0.8 * _normal(seed + 4, rows, 3) - 1.0
    return source, target


def _scipy_canonical_correlations(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Return the canonical correlations as cosines of the principal angles, largest first."""
    source_centred = source - source.mean(axis=0)
    target_centred = target - target.mean(axis=0)
    angles = scipy.linalg.subspace_angles(source_centred, target_centred)
    return np.sort(np.cos(angles))[::-1]


def test_cca_correlations_match_scipy_principal_angles() -> None:
    source, target = _paired_views(seed=0, rows=50)
    plugin = CCAAlignment(CCAAlignment.Params(eps=0.0), source_dim=4, target_dim=3)
    expected = _scipy_canonical_correlations(source, target)

    plugin.fit(_tensor(source), _tensor(target))
    batch_value = plugin(_tensor(source), _tensor(target)).item()

    assert expected.shape == (3,)
    assert expected[0] > 0.8
    np.testing.assert_allclose(plugin.correlations.numpy(), expected, rtol=0.0, atol=1e-10)
    assert batch_value == pytest.approx(-expected.sum(), abs=1e-10)


def test_cca_top_k_loss_sums_largest_correlations() -> None:
    source, target = _paired_views(seed=1, rows=40)
    plugin = CCAAlignment(CCAAlignment.Params(components=2, eps=0.0), source_dim=4, target_dim=3)

    value = plugin(_tensor(source), _tensor(target)).item()

    assert value == pytest.approx(-_scipy_canonical_correlations(source, target)[:2].sum(), abs=1e-10)


def test_cca_transformed_variates_have_canonical_correlations() -> None:
    source, target = _paired_views(seed=2, rows=60)
    plugin = CCAAlignment(CCAAlignment.Params(eps=0.0), source_dim=4, target_dim=3)

    plugin.fit(_tensor(source), _tensor(target))
    source_variates = plugin.transform(_tensor(source)).numpy()
    target_variates = plugin.transform_target(_tensor(target)).numpy()
    correlation = np.corrcoef(source_variates, target_variates, rowvar=False)
    cross = correlation[:3, 3:]

    np.testing.assert_allclose(np.diag(cross), plugin.correlations.numpy(), rtol=0.0, atol=1e-10)
    np.testing.assert_allclose(cross - np.diag(np.diag(cross)), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.cov(source_variates, rowvar=False), np.eye(3), atol=1e-10)
    np.testing.assert_allclose(np.cov(target_variates, rowvar=False), np.eye(3), atol=1e-10)


def test_cca_rejects_more_components_than_width() -> None:
    with pytest.raises(ValueError, match=r"at most 3 canonical pairs here, but components is 4"):
        CCAAlignment(CCAAlignment.Params(components=4), source_dim=5, target_dim=3)


# Deep CCA


def _inverse_square_root(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T


def _reference_dcca_correlations(source: np.ndarray, target: np.ndarray, eps: float) -> np.ndarray:
    """Return the singular values of S_ss^-1/2 S_st S_tt^-1/2, largest first."""
    rows = source.shape[0]
    source_centred = source - source.mean(axis=0)
    target_centred = target - target.mean(axis=0)
    sigma_ss = source_centred.T @ source_centred / (rows - 1) + eps * np.eye(source.shape[1])
    sigma_tt = target_centred.T @ target_centred / (rows - 1) + eps * np.eye(target.shape[1])
    sigma_st = source_centred.T @ target_centred / (rows - 1)
    whitened = _inverse_square_root(sigma_ss) @ sigma_st @ _inverse_square_root(sigma_tt)
    return np.linalg.svd(whitened, compute_uv=False)


@pytest.mark.parametrize("components", [None, 2])
def test_dcca_loss_is_negative_canonical_correlation_sum(components: int | None) -> None:
    source, target = _paired_views(seed=3, rows=30)
    eps = 1e-2
    torch.manual_seed(0)
    plugin = DeepCCAAlignment(
        DeepCCAAlignment.Params(dim=3, components=components, eps=eps), source_dim=4, target_dim=3
    )

    value = plugin(_tensor(source, torch.float32), _tensor(target, torch.float32)).item()
    # Round the references to float32, as the plugin's inputs are.
    source_rounded = source.astype(np.float32).astype(np.float64)
    target_rounded = target.astype(np.float32).astype(np.float64)
    correlations = _reference_dcca_correlations(
        source_rounded @ _weight(plugin.source_projection),
        target_rounded @ _weight(plugin.target_projection),
        eps,
    )
    expected = -correlations[: components or 3].sum()

    assert correlations.shape == (3,)
    assert value == pytest.approx(expected, rel=1e-4)


# CLIP


def _reference_clip_loss(source: np.ndarray, target: np.ndarray, scale: float) -> float:
    logits = scale * _normalize_rows(source) @ _normalize_rows(target).T
    rows = np.arange(len(logits))
    source_to_target = np.mean(logsumexp(logits, axis=1) - logits[rows, rows])
    target_to_source = np.mean(logsumexp(logits, axis=0) - logits[rows, rows])
    return float((source_to_target + target_to_source) / 2.0)


def test_clip_matches_numpy_infonce() -> None:
    source, target = _normal(0, 6, 5), _normal(1, 6, 7)
    source[:, 0] += target[:, 0]  # Make the pairs partly agree.
    torch.manual_seed(0)
    plugin = CLIPAlignment(CLIPAlignment.Params(dim=8), source_dim=5, target_dim=7)

    value = plugin(_tensor(source, torch.float32), _tensor(target, torch.float32)).item()
    expected = _reference_clip_loss(
        source @ _weight(plugin.source_projection),
        target @ _weight(plugin.target_projection),
        scale=1.0 / 0.07,
    )

    assert value == pytest.approx(expected, rel=1e-5)


def test_clip_unrelated_pairs_near_log_batch() -> None:
    # With temperature 1 and 256 channels, the logits of unrelated rows have a standard
    # deviation near 1 / 16, so every softmax is close to uniform. The expected loss
    # exceeds log B by about 0.002, and the batch mean of the positive logits adds noise
    # with a standard deviation near 0.008, so the tolerance of 0.05 is about 6 of those.
    batch = 64
    generator = torch.Generator().manual_seed(7)
    source = torch.randn(batch, 32, generator=generator)
    target = torch.randn(batch, 48, generator=generator)
    torch.manual_seed(0)
    plugin = CLIPAlignment(
        CLIPAlignment.Params(dim=256, initial_temperature=1.0), source_dim=32, target_dim=48
    )

    value = plugin(source, target).item()

    assert abs(value - math.log(batch)) < 0.05


def test_clip_temperature_is_clamped_parameter() -> None:
    source, target = _normal(2, 5, 4), _normal(3, 5, 4)
    torch.manual_seed(0)
    plugin = CLIPAlignment(CLIPAlignment.Params(dim=6), source_dim=4, target_dim=4)
    projected_source = source @ _weight(plugin.source_projection)
    projected_target = target @ _weight(plugin.target_projection)

    parameters = dict(plugin.named_parameters())
    assert "logit_scale" in parameters
    assert parameters["logit_scale"].item() == pytest.approx(math.log(1.0 / 0.07), rel=1e-6)

    unclamped = plugin(_tensor(source, torch.float32), _tensor(target, torch.float32))
    unclamped.backward()
    assert plugin.logit_scale.grad is not None
    assert plugin.logit_scale.grad.abs() > 0

    with torch.no_grad():
        plugin.logit_scale.fill_(math.log(1000.0))
    plugin.zero_grad()
    clamped = plugin(_tensor(source, torch.float32), _tensor(target, torch.float32))
    clamped.backward()

    expected = _reference_clip_loss(projected_source, projected_target, scale=100.0)
    assert clamped.item() == pytest.approx(expected, rel=1e-5)
    assert plugin.logit_scale.grad is not None
    assert plugin.logit_scale.grad.item() == 0.0
    assert plugin.logit_scale.item() == pytest.approx(math.log(1000.0), rel=1e-6)


# Procrustes


def _random_orthogonal(seed: int, width: int) -> np.ndarray:
    matrix, _ = np.linalg.qr(_normal(seed, width, width))
    return matrix


def test_procrustes_recovers_known_rotation() -> None:
    source = _normal(0, 40, 5)
    rotation = _random_orthogonal(1, 5)
    target = source @ rotation + 1e-3 * _normal(2, 40, 5)
    plugin = ProcrustesAlignment(ProcrustesAlignment.Params(), source_dim=5, target_dim=5)

    plugin.fit(_tensor(source), _tensor(target))
    fitted = plugin.rotation.numpy()
    expected, _ = scipy.linalg.orthogonal_procrustes(source, target)

    np.testing.assert_allclose(fitted, expected, rtol=0.0, atol=1e-10)
    np.testing.assert_allclose(fitted, rotation, rtol=0.0, atol=1e-2)
    np.testing.assert_allclose(fitted.T @ fitted, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(plugin.transform(_tensor(source)).numpy(), target, atol=1e-2)


def test_procrustes_loss_is_residual_under_batch_rotation() -> None:
    source = _normal(3, 12, 4)
    target = source @ _random_orthogonal(4, 4) + 0.3 * _normal(5, 12, 4)
    plugin = ProcrustesAlignment(ProcrustesAlignment.Params(), source_dim=4, target_dim=4)

    value = plugin(_tensor(source), _tensor(target)).item()
    rotation, _ = scipy.linalg.orthogonal_procrustes(source, target)
    expected = np.mean(np.sum((source @ rotation - target) ** 2, axis=1))

    assert expected > 0.1
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(("source_dim", "target_dim"), [(3, 3), (2, 4), (4, 2)])
def test_procrustes_gradient_equals_gradient_of_minimum(source_dim: int, target_dim: int) -> None:
    # The loss gives no gradient through the SVD. The gradient of the minimum over R
    # must still match central differences of that minimum, zero padding included.
    width = max(source_dim, target_dim)
    source = _normal(6, 6, source_dim)
    shared = np.pad(source, ((0, 0), (0, width - source_dim)))[:, :target_dim]
    target = _normal(7, 6, target_dim) + 0.5 * shared
    plugin = ProcrustesAlignment(
        ProcrustesAlignment.Params(), source_dim=source_dim, target_dim=target_dim
    )
    source_tensor = _tensor(source).requires_grad_()

    plugin(source_tensor, _tensor(target)).backward()

    def minimum(rows: np.ndarray) -> float:
        padded_rows = np.pad(rows, ((0, 0), (0, width - source_dim)))
        padded_target = np.pad(target, ((0, 0), (0, width - target_dim)))
        rotation, _ = scipy.linalg.orthogonal_procrustes(padded_rows, padded_target)
        return float(np.mean(np.sum((padded_rows @ rotation - padded_target) ** 2, axis=1)))

    step = 1e-6
    numerical = np.zeros_like(source)
    for index in np.ndindex(*source.shape):
        shift = np.zeros_like(source)
        shift[index] = step
        numerical[index] = (minimum(source + shift) - minimum(source - shift)) / (2.0 * step)
    np.testing.assert_allclose(source_tensor.grad.numpy(), numerical, rtol=0.0, atol=1e-6)


def test_procrustes_pads_narrower_source() -> None:
    source = _normal(9, 30, 3)
    rows_orthonormal = _random_orthogonal(10, 5)[:3]  # (3, 5) with orthonormal rows
    target = source @ rows_orthonormal
    plugin = ProcrustesAlignment(ProcrustesAlignment.Params(), source_dim=3, target_dim=5)

    plugin.fit(_tensor(source), _tensor(target))
    mapped = plugin.transform(_tensor(source)).numpy()

    assert plugin.rotation.shape == (5, 5)
    assert mapped.shape == (30, 5)
    np.testing.assert_allclose(mapped, target, rtol=0.0, atol=1e-10)


def test_procrustes_center_adds_target_mean() -> None:
    source = _normal(11, 25, 4) + 5.0
    rotation = _random_orthogonal(12, 4)
    target = (source - source.mean(axis=0)) @ rotation - 2.0
    plugin = ProcrustesAlignment(ProcrustesAlignment.Params(center=True), source_dim=4, target_dim=4)

    plugin.fit(_tensor(source), _tensor(target))

    np.testing.assert_allclose(plugin.rotation.numpy(), rotation, rtol=0.0, atol=1e-10)
    np.testing.assert_allclose(plugin.transform(_tensor(source)).numpy(), target, rtol=0.0, atol=1e-10)
    assert plugin(_tensor(source), _tensor(target)).item() == pytest.approx(0.0, abs=1e-20)


# CAAN


def _reference_caan_similarity(
    source: np.ndarray,
    target: np.ndarray,
    source_weight: np.ndarray,
    target_weight: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Compute S from the CAAN docstring formulas with explicit loops over row pairs."""

    def softmax(values: np.ndarray, axis: int) -> np.ndarray:
        return np.exp(values - logsumexp(values, axis=axis, keepdims=True))

    batch = source.shape[0]
    similarity = np.zeros((batch, batch))
    for a in range(batch):
        for b in range(batch):
            s = _normalize_rows(source[a] @ source_weight)
            t = _normalize_rows(target[b] @ target_weight)
            affinity = s @ t.T
            over_source = softmax(scale * affinity, axis=0)
            over_target = softmax(scale * affinity, axis=1)
            source_profiles = _normalize_rows(over_source)
            target_profiles = _normalize_rows(over_target.T)
            source_context = source_profiles @ source_profiles.T
            target_context = target_profiles @ target_profiles.T
            source_relevance = (source_context @ affinity.mean(axis=1)) / source_context.sum(axis=1)
            target_relevance = (target_context @ affinity.mean(axis=0)) / target_context.sum(axis=1)
            alpha = softmax(scale * source_relevance, axis=0)
            beta = softmax(scale * target_relevance, axis=0)
            pooled_source, pooled_target = alpha @ s, beta @ t
            similarity[a, b] = pooled_source @ pooled_target / (
                np.linalg.norm(pooled_source) * np.linalg.norm(pooled_target)
            )
    return similarity


def _reference_hinge_loss(similarity: np.ndarray, margin: float, hardest: bool) -> float:
    batch = len(similarity)
    total = 0.0
    for a in range(batch):
        negatives = [b for b in range(batch) if b != a]
        source_costs = [max(0.0, margin - similarity[a, a] + similarity[a, b]) for b in negatives]
        target_costs = [max(0.0, margin - similarity[a, a] + similarity[b, a]) for b in negatives]
        if hardest:
            total += max(source_costs) + max(target_costs)
        else:
            total += sum(source_costs) + sum(target_costs)
    return total / batch


def test_caan_output_shapes() -> None:
    torch.manual_seed(0)
    plugin = CAANAlignment(CAANAlignment.Params(dim=8), source_dim=6, target_dim=5)
    source, target = torch.randn(4, 3, 6), torch.randn(4, 7, 5)

    similarity = plugin.similarity(source, target)
    loss = plugin(source, target)

    assert similarity.shape == (4, 4)
    assert loss.shape == ()
    assert plugin.source_attention is not None
    assert plugin.target_attention is not None
    assert plugin.source_attention.shape == (4, 4, 3)
    assert plugin.target_attention.shape == (4, 4, 7)
    assert not plugin.source_attention.requires_grad
    torch.testing.assert_close(plugin.source_attention.sum(dim=-1), torch.ones(4, 4))
    torch.testing.assert_close(plugin.target_attention.sum(dim=-1), torch.ones(4, 4))


def test_caan_similarity_matches_loop_reference() -> None:
    source, target = _normal(0, 3, 4, 6), _normal(1, 3, 5, 5)
    torch.manual_seed(0)
    plugin = CAANAlignment(CAANAlignment.Params(dim=8, attention_scale=4.0), source_dim=6, target_dim=5)

    similarity = plugin.similarity(_tensor(source, torch.float32), _tensor(target, torch.float32))
    expected = _reference_caan_similarity(
        source, target, _weight(plugin.source_projection), _weight(plugin.target_projection), scale=4.0
    )

    np.testing.assert_allclose(similarity.detach().numpy(), expected, rtol=0.0, atol=1e-5)


def test_caan_pooled_inputs_reduce_to_cosine() -> None:
    source, target = _normal(2, 5, 6), _normal(3, 5, 4)
    torch.manual_seed(0)
    plugin = CAANAlignment(CAANAlignment.Params(dim=8), source_dim=6, target_dim=4)

    similarity = plugin.similarity(_tensor(source, torch.float32), _tensor(target, torch.float32))
    projected_source = _normalize_rows(source @ _weight(plugin.source_projection))
    projected_target = _normalize_rows(target @ _weight(plugin.target_projection))

    np.testing.assert_allclose(
        similarity.detach().numpy(), projected_source @ projected_target.T, rtol=0.0, atol=1e-5
    )


@pytest.mark.parametrize("hardest", [True, False])
def test_caan_loss_matches_hinge_reference(hardest: bool) -> None:
    source, target = _normal(4, 5, 2, 6), _normal(5, 5, 3, 5)
    torch.manual_seed(0)
    params = CAANAlignment.Params(dim=8, margin=0.3, hardest_negative=hardest)
    plugin = CAANAlignment(params, source_dim=6, target_dim=5)

    value = plugin(_tensor(source, torch.float32), _tensor(target, torch.float32)).item()
    similarity = plugin.similarity(_tensor(source, torch.float32), _tensor(target, torch.float32))
    expected = _reference_hinge_loss(similarity.detach().double().numpy(), margin=0.3, hardest=hardest)

    assert expected > 0.0
    assert value == pytest.approx(expected, rel=1e-5)


def test_caan_identical_target_beats_shuffled_target() -> None:
    # Identical inputs only match when both sides share one projection.
    generator = torch.Generator().manual_seed(8)
    source = torch.randn(6, 4, 8, generator=generator)
    shuffled = source[torch.tensor([1, 2, 3, 4, 5, 0])]
    torch.manual_seed(0)
    plugin = CAANAlignment(CAANAlignment.Params(dim=8), source_dim=8, target_dim=8)
    with torch.no_grad():
        plugin.target_projection.weight.copy_(plugin.source_projection.weight)

    identical_loss = plugin(source, source).item()
    identical_similarity = plugin.similarity(source, source).diagonal()
    shuffled_loss = plugin(source, shuffled).item()

    torch.testing.assert_close(identical_similarity, torch.ones(6))
    assert identical_loss < shuffled_loss


def test_caan_rejects_wrong_token_width() -> None:
    plugin = CAANAlignment(CAANAlignment.Params(dim=8), source_dim=6, target_dim=5)

    expected = r"expected target features of shape \(batch, 5\) or \(batch, tokens, 5\), got \(4, 2, 6\)"

    with pytest.raises(ValueError, match=expected):
        plugin(torch.randn(4, 3, 6), torch.randn(4, 2, 6))
