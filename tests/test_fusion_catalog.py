"""Each fusion plugin against an independent numpy computation of its formula.

The references read the plugin's weights but none of its code: they rebuild the forward
pass from the formula in the plugin's docstring with numpy (and scipy's erf for GELU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import erf
from torch import nn

from mmkd.plugins.fusion import (
    CovarianceFusion,
    CrossModalTransformerFusion,
    GatedMultimodalUnit,
    LateFusion,
    LowRankFusion,
    TensorFusion,
)

DIMS = (5, 7, 3)
MASK = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])


def features(seed: int = 0, dims=DIMS, batch: int = MASK.shape[0]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=generator) for dim in dims]


def linear(layer: nn.Linear, x: np.ndarray) -> np.ndarray:
    weight = layer.weight.detach().double().numpy()
    bias = layer.bias.detach().double().numpy() if layer.bias is not None else 0.0
    return x @ weight.T + bias


def numpy_inputs(tensors, mask):
    """The inputs as float64 arrays, with missing modalities zeroed as every plugin does."""
    return [t.double().numpy() * mask[:, i : i + 1].numpy() for i, t in enumerate(tensors)]


def run(plugin, tensors, mask=MASK) -> np.ndarray:
    plugin.eval()
    with torch.no_grad():
        return plugin(tensors, mask).double().numpy()


def test_late_fusion_is_weighted_average_of_present_modalities():
    torch.manual_seed(0)
    plugin = LateFusion(DIMS, LateFusion.Params(dim=4))
    with torch.no_grad():
        plugin.modality_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    tensors = features()
    inputs = numpy_inputs(tensors, MASK)

    expected = np.zeros((3, 4))
    for row in range(3):
        present = MASK[row].numpy()
        logits = np.array([0.5, -1.0, 2.0])[present]
        weights = np.exp(logits) / np.exp(logits).sum()
        predictions = [linear(plugin.projections[i], inputs[i][row]) for i in np.flatnonzero(present)]
        expected[row] = sum(w * p for w, p in zip(weights, predictions))
    np.testing.assert_allclose(run(plugin, tensors), expected, atol=1e-6)


def test_late_fusion_head_averages_per_modality_logits():
    torch.manual_seed(1)
    plugin = LateFusion(DIMS, LateFusion.Params(dim=4))
    head = nn.Linear(4, 6)
    tensors = features(seed=2)
    plugin.eval()
    with torch.no_grad():
        fused_logits = head(plugin(tensors, MASK))
        row = 0  # every modality present
        weights = torch.softmax(plugin.modality_weights, dim=0)
        per_modality = [head(projection(t[row : row + 1])) for projection, t in zip(plugin.projections, tensors)]
        averaged = sum(w * logits for w, logits in zip(weights, per_modality))
    torch.testing.assert_close(fused_logits[row : row + 1], averaged, atol=1e-6, rtol=0)


def test_gmu_two_modalities_is_sigmoid_unit():
    torch.manual_seed(3)
    dims = (5, 7)
    mask = torch.ones(4, 2, dtype=torch.bool)
    plugin = GatedMultimodalUnit(dims, GatedMultimodalUnit.Params(dim=6))
    tensors = features(seed=4, dims=dims, batch=4)
    x1, x2 = numpy_inputs(tensors, mask)

    h1 = np.tanh(linear(plugin.hidden[0], x1))
    h2 = np.tanh(linear(plugin.hidden[1], x2))
    weight = plugin.gates.weight.detach().double().numpy()
    bias = plugin.gates.bias.detach().double().numpy()
    # Gate rows 0..5 belong to modality 1 and 6..11 to modality 2: W_z = V_1 - V_2.
    w_z, b_z = weight[:6] - weight[6:], bias[:6] - bias[6:]
    s = 1.0 / (1.0 + np.exp(-(np.concatenate([x1, x2], axis=1) @ w_z.T + b_z)))
    np.testing.assert_allclose(run(plugin, tensors, mask), s * h1 + (1 - s) * h2, atol=1e-6)


def test_gmu_missing_modality_gets_zero_gate():
    torch.manual_seed(5)
    plugin = GatedMultimodalUnit(DIMS, GatedMultimodalUnit.Params(dim=6))
    tensors = features(seed=6)
    # Row 2 has only modality 2 (index 1), so its output is that modality's tanh unit.
    expected = np.tanh(linear(plugin.hidden[1], numpy_inputs(tensors, MASK)[1][2]))
    np.testing.assert_allclose(run(plugin, tensors)[2], expected, atol=1e-6)


def layer_norm(x: np.ndarray, norm: nn.LayerNorm) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + norm.eps) * norm.weight.detach().double().numpy() + norm.bias.detach().double().numpy()


def cross_block(block, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    heads, head_dim = block.heads, block.head_dim
    query = linear(block.query, layer_norm(target, block.target_norm))
    key_value = linear(block.key_value, layer_norm(source, block.source_norm))
    dim = heads * head_dim
    key, value = key_value[:, :dim], key_value[:, dim:]
    attended = np.zeros_like(target)
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = query[:, part] @ key[:, part].T / np.sqrt(head_dim)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended[:, part] = weights @ value[:, part]
    updated = target + linear(block.out, attended)
    hidden = linear(block.mlp[0], layer_norm(updated, block.mlp_norm))
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    return updated + linear(block.mlp[3], hidden)


def test_mult_matches_numpy_cross_modal_attention():
    torch.manual_seed(7)
    params = CrossModalTransformerFusion.Params(dim=8, heads=2, tokens=3, dropout=0.0)
    plugin = CrossModalTransformerFusion(DIMS, params)
    tensors = features(seed=8)
    inputs = numpy_inputs(tensors, MASK)
    positions = plugin.positions.detach().double().numpy()
    count = len(DIMS)

    expected = np.zeros((3, count * 8))
    for row in range(3):
        present = MASK[row].numpy()
        streams = [linear(plugin.projections[i], inputs[i][row]).reshape(3, 8) + positions[i] for i in range(count)]
        for i in np.flatnonzero(present):
            outputs = [cross_block(plugin.blocks[j * count + i][0], streams[i], streams[j]) for j in np.flatnonzero(present)]
            pooled = np.mean(outputs, axis=0).mean(axis=0)
            expected[row, i * 8 : (i + 1) * 8] = layer_norm(pooled, plugin.final_norm)
    np.testing.assert_allclose(run(plugin, tensors), expected, atol=1e-5)


def extended_projections(plugin, tensors, mask) -> list[np.ndarray]:
    inputs = numpy_inputs(tensors, mask)
    return [
        np.concatenate([linear(p, x) * mask[:, i : i + 1].numpy(), np.ones((x.shape[0], 1))], axis=1)
        for i, (p, x) in enumerate(zip(plugin.projections, inputs))
    ]


def test_tensor_fusion_is_per_row_kronecker_product():
    torch.manual_seed(9)
    plugin = TensorFusion(DIMS, TensorFusion.Params(dim=2))
    tensors = features(seed=10)
    parts = extended_projections(plugin, tensors, MASK)
    expected = np.stack([np.kron(np.kron(parts[0][r], parts[1][r]), parts[2][r]) for r in range(3)])
    assert plugin.output_dim == 27
    np.testing.assert_allclose(run(plugin, tensors), expected, atol=1e-6)


def test_lowrank_equals_tensor_fusion_then_rank_r_map():
    torch.manual_seed(11)
    plugin = LowRankFusion(DIMS, LowRankFusion.Params(dim=2, output_dim=4, rank=3))
    tensors = features(seed=12)

    # The same projections inside a tensor fusion give vec([z1;1] x [z2;1] x [z3;1]).
    tensor_plugin = TensorFusion(DIMS, TensorFusion.Params(dim=2))
    tensor_plugin.projections.load_state_dict(plugin.projections.state_dict())
    fused = run(tensor_plugin, tensors)

    # The full weight: W[o] = sum_k w_k * A1[k, :, o] x A2[k, :, o] x A3[k, :, o].
    factors = [f.detach().double().numpy() for f in plugin.factors]
    rank_weights = plugin.rank_weights.detach().double().numpy()
    full = np.zeros((4, 27))
    for k in range(3):
        for o in range(4):
            full[o] += rank_weights[k] * np.kron(np.kron(factors[0][k, :, o], factors[1][k, :, o]), factors[2][k, :, o])
    expected = fused @ full.T + plugin.bias.detach().double().numpy()
    np.testing.assert_allclose(run(plugin, tensors), expected, atol=1e-5)


def test_covariance_fusion_is_rooted_normalised_outer_products():
    torch.manual_seed(13)
    dims = (5, 7)
    mask = torch.tensor([[True, True], [True, False]])
    plugin = CovarianceFusion(dims, CovarianceFusion.Params(dim=3))
    tensors = features(seed=14, dims=dims, batch=2)
    z = [linear(p, x) * mask[:, i : i + 1].numpy() for i, (p, x) in enumerate(zip(plugin.projections, numpy_inputs(tensors, mask)))]

    expected = []
    for row in range(2):
        parts = []
        for i, j in ((0, 0), (0, 1), (1, 1)):
            outer = np.outer(z[i][row], z[j][row]).ravel()
            rooted = np.sign(outer) * np.sqrt(np.abs(outer))
            norm = np.linalg.norm(rooted)
            parts.append(rooted / norm if norm > 0 else rooted)
        expected.append(np.concatenate(parts))
    # The smoothing eps = 1e-6 moves entries of size ~1 by about eps / 2 before normalising.
    np.testing.assert_allclose(run(plugin, tensors, mask), np.array(expected), atol=1e-3)
    # Row 1 lacks modality 2: the pairs that include it are zero.
    assert not run(plugin, tensors, mask)[1, 9:].any()


def test_tensor_fusion_rejects_huge_outputs():
    # Four modalities at dim 40 would give 41^4 = 2,825,761 outputs.
    with pytest.raises(ValueError, match=r"more than 2\^20\. Lower dim, or use lowrank fusion"):
        TensorFusion((4, 4, 4, 4), TensorFusion.Params(dim=40))
