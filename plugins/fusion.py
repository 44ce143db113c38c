"""Built-in fusion plugins, from early fusion by concatenation to cross-modal attention.

Each takes one (batch, input_dims[m]) tensor per modality and a (batch, modalities) bool
mask, True where the row has that modality. Features of a missing modality are replaced
by zeros before any computation, so even NaN placeholders cannot reach the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mmkd.plugin_api import FusionPlugin, PluginParams

__all__ = [
    "AttentionFusion",
    "ConcatFusion",
    "CovarianceFusion",
    "CrossModalTransformerFusion",
    "GatedMultimodalUnit",
    "LateFusion",
    "LowRankFusion",
    "TensorFusion",
]


def _validate_inputs(
    features: Sequence[torch.Tensor], mask: torch.Tensor, input_dims: Sequence[int]
) -> None:
    """Raise ValueError unless `features` and `mask` fit the plugin's modalities."""
    if len(features) != len(input_dims):
        raise ValueError(
            f"Fusion expected {len(input_dims)} modality tensors (input_dims={list(input_dims)}), "
            f"got {len(features)}. Pass one tensor per modality, in config order."
        )
    if mask.dim() != 2 or mask.shape[1] != len(input_dims):
        raise ValueError(
            f"Fusion expected a (batch, {len(input_dims)}) modality mask, got shape "
            f"{tuple(mask.shape)}."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"Fusion expected a bool modality mask, got dtype {mask.dtype}.")
    for index, (tensor, dim) in enumerate(zip(features, input_dims)):
        if tensor.dim() != 2 or tensor.shape[1] != dim:
            raise ValueError(
                f"Fusion expected modality {index} features of shape (batch, {dim}), got "
                f"{tuple(tensor.shape)}."
            )


def _zero_missing(features: Sequence[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """Return the features with every row of a missing modality set to zero."""
    return [
        tensor.masked_fill(~mask[:, index].unsqueeze(1), 0.0)
        for index, tensor in enumerate(features)
    ]


class ConcatFusion(FusionPlugin):
    """Early fusion: concatenate the modality embeddings, with missing ones set to zero.

    Formula: z = dropout([x_1 * m_1 ; x_2 * m_2 ; ... ; x_M * m_M]), where m_i is 1 when
    the row has modality i and 0 otherwise. The output width is sum(input_dims). This is
    the feature-level (early) fusion that Snoek, Worring & Smeulders, "Early versus Late
    Fusion in Semantic Video Analysis" (ACM Multimedia 2005), compare with late fusion.

    Config example:

    ```yaml
    student:
      fusion:
        name: concat
        params: {dropout: 0.1}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: A `ConcatFusion.Params`.
    """

    class Params(PluginParams):
        """Options of `ConcatFusion`."""

        dropout: float = Field(
            default=0.0, ge=0.0, lt=1.0, description="Dropout probability on the fused vector."
        )

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        self.output_dim = sum(self.input_dims)
        self.dropout = nn.Dropout(params.dropout)

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, sum(input_dims)) tensor."""
        _validate_inputs(features, mask, self.input_dims)
        return self.dropout(torch.cat(_zero_missing(features, mask), dim=1))


class _AttentionBlock(nn.Module):
    """Pre-norm transformer encoder block over modality tokens that ignores missing keys.

    Attention is written with Linear layers, matmul and softmax instead of
    `nn.MultiheadAttention` so that the ONNX export has plain operators and a dynamic
    batch dimension.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.attention_norm = nn.LayerNorm(dim)
        # Q, K and V share one Linear layer. A separate key layer would have a bias with zero
        # gradient, because that bias shifts all scores of a query equally and softmax
        # ignores such a shift.
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_ratio * dim, dim),
            nn.Dropout(dropout),
        )

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the updated (batch, M, dim) tokens and the (batch, heads, M, M) weights."""
        num_tokens, dim = tokens.shape[1], tokens.shape[2]

        # Split (batch, M, 3 * dim) into 3 x (batch, heads, M, head_dim). The -1 keeps the
        # batch dimension dynamic in an ONNX export.
        qkv = self.qkv(self.attention_norm(tokens))
        qkv = qkv.reshape(-1, num_tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]

        # The minimum finite float, unlike -inf, gives missing keys a weight of exactly 0
        # and still gives a row with no modality uniform weights instead of NaN. The
        # pooling drops that row's tokens anyway.
        scores = torch.matmul(query, key.transpose(-2, -1)) * self.scale
        key_missing = ~mask[:, None, None, :]
        scores = scores.masked_fill(key_missing, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)

        attended = torch.matmul(self.attention_dropout(weights), value)
        attended = attended.transpose(1, 2).reshape(-1, num_tokens, dim)
        tokens = tokens + self.out(attended)
        tokens = tokens + self.mlp(self.mlp_norm(tokens))
        return tokens, weights


class AttentionFusion(FusionPlugin):
    """Cross-modal fusion: self-attention over one token per modality, then mean pooling.

    Each modality embedding x_i becomes a token t_i = W_i x_i + b_i + e_i, where e_i is a
    learned modality embedding. `layers` pre-norm transformer blocks update the tokens:

        t = t + Out(softmax(Q K^T / sqrt(dim / heads) + B) V),  Q, K, V from LayerNorm(t)
        t = t + MLP(LayerNorm(t))

    B is 0 for keys of present modalities and the minimum finite float for missing ones,
    and there is no causal mask. The output is the mean of LayerNorm(t_i) over the
    present modalities, or zeros for a row with no modality. Its width is `dim`. The
    block follows the pre-norm encoder of Xiong et al., "On Layer Normalization in the
    Transformer Architecture" (ICML 2020), with tokens per modality as in Tsai et al.,
    "Multimodal Transformer for Unaligned Multimodal Language Sequences" (ACL 2019),
    which uses pairwise cross-modal attention rather than one joint self-attention.

    After each forward, `attention_weights` holds the last block's weights before
    dropout, detached, shaped (batch, heads, M, M) with M the number of modalities.

    Config example:

    ```yaml
    student:
      fusion:
        name: attention
        params: {dim: 128, heads: 4, layers: 1, dropout: 0.1}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: An `AttentionFusion.Params`.
    """

    class Params(PluginParams):
        """Options of `AttentionFusion`."""

        dim: int = Field(
            default=128, ge=1, le=8192, description="Token and output width, a multiple of heads."
        )
        heads: int = Field(default=4, ge=1, le=128, description="Number of attention heads.")
        layers: int = Field(default=1, ge=1, le=24, description="Number of transformer blocks.")
        mlp_ratio: int = Field(
            default=4, ge=1, le=16, description="Feed-forward hidden width as a multiple of dim."
        )
        dropout: float = Field(
            default=0.1,
            ge=0.0,
            lt=1.0,
            description="Dropout probability on attention weights and feed-forward outputs.",
        )

        @model_validator(mode="after")
        def _check_heads_divide_dim(self) -> AttentionFusion.Params:
            if self.dim % self.heads != 0:
                raise ValueError(
                    f"dim {self.dim} is not divisible by heads {self.heads}. Choose dim as a "
                    f"multiple of heads, such as {self.heads * max(1, self.dim // self.heads)}."
                )
            return self

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        self.output_dim = params.dim
        self.projections = nn.ModuleList(nn.Linear(width, params.dim) for width in self.input_dims)
        self.modality_embedding = nn.Parameter(torch.empty(len(self.input_dims), params.dim))
        nn.init.normal_(self.modality_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            _AttentionBlock(params.dim, params.heads, params.mlp_ratio, params.dropout)
            for _ in range(params.layers)
        )
        self.final_norm = nn.LayerNorm(params.dim)
        self.attention_weights: torch.Tensor | None = None

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, dim) tensor."""
        _validate_inputs(features, mask, self.input_dims)

        # One token per modality: (batch, M, dim).
        features = _zero_missing(features, mask)
        tokens = torch.stack(
            [projection(tensor) for projection, tensor in zip(self.projections, features)], dim=1
        )
        tokens = tokens + self.modality_embedding

        for block in self.blocks:
            tokens, weights = block(tokens, mask)
        self.attention_weights = weights.detach()

        # Mean over present tokens. Clamping the count at 1 turns a row with no modality
        # into zeros instead of NaN.
        tokens = self.final_norm(tokens)
        present = mask.to(tokens.dtype).unsqueeze(-1)
        count = present.sum(dim=1).clamp(min=1.0)
        return (tokens * present).sum(dim=1) / count


def _project_each(projections: nn.ModuleList, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [projection(tensor) for projection, tensor in zip(projections, features)]


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over `dim` with masked-out entries at exactly 0, and uniform when all are masked."""
    return torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=dim)


class LateFusion(FusionPlugin):
    """Late fusion: a weighted average of per-modality predictions, over present modalities.

    Each modality gets its own linear map z_i = W_i x_i + b_i to width `dim`, and the output
    is the weighted average over the modalities the row has:

        z = sum_i a_i z_i,   a = softmax(w) restricted to present modalities

    with w a learned vector of M modality weights (fixed at 0, so equal weights, when
    `learn_weights` is false). A row with no modality gets zeros. The weights sum to 1 and
    the model's head is linear, so head(z) = sum_i a_i head(z_i). The logits are therefore
    the weighted average of the logits that each modality alone would give. This is late
    fusion of per-modality classifiers (W_head W_i), as in the decision-level fusion of
    Snoek, Worring & Smeulders, "Early versus Late Fusion in Semantic Video Analysis"
    (ACM Multimedia 2005).

    Config example:

    ```yaml
    student:
      fusion:
        name: late
        params: {dim: 64, learn_weights: true}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: A `LateFusion.Params`.
    """

    class Params(PluginParams):
        """Options of `LateFusion`."""

        dim: int = Field(default=64, ge=1, le=8192, description="Width of each modality's prediction vector.")
        learn_weights: bool = Field(
            default=True, description="Learn the modality weights; otherwise every present modality counts equally."
        )

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        self.output_dim = params.dim
        self.projections = nn.ModuleList(nn.Linear(width, params.dim) for width in self.input_dims)
        weights = torch.zeros(len(self.input_dims))
        if params.learn_weights:
            self.modality_weights = nn.Parameter(weights)
        else:
            self.register_buffer("modality_weights", weights)

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, dim) tensor."""
        _validate_inputs(features, mask, self.input_dims)
        predictions = torch.stack(_project_each(self.projections, _zero_missing(features, mask)), dim=1)
        weights = _masked_softmax(self.modality_weights.expand(mask.shape), mask, dim=1)
        # A row with no modality would get uniform weights over zeroed inputs' biases.
        weights = weights * mask.any(dim=1, keepdim=True)
        return (weights.unsqueeze(-1) * predictions).sum(dim=1)


class GatedMultimodalUnit(FusionPlugin):
    """Gated multimodal unit: per-dimension gates choose how much of each modality passes.

    Formula, with x = [x_1; ...; x_M] the concatenated inputs (missing ones zeroed):

        h_i = tanh(W_i x_i)
        g = softmax over present modalities i of (V_i x + c_i), per output dimension
        z = sum_i g_i * h_i

    For two modalities this is the unit of Arevalo, Solorio, Montes-y-Gómez & González,
    "Gated Multimodal Units for Information Fusion" (ICLR 2017 workshop). There,
    z = s * h_1 + (1 - s) * h_2 with s = sigmoid(W_z x), and a softmax over two logits is
    the sigmoid of their difference (W_z = V_1 - V_2). The softmax form extends
    it to any number of modalities and lets a missing modality get a gate of exactly 0.
    A row with no modality gets zeros.

    Config example:

    ```yaml
    student:
      fusion:
        name: gmu
        params: {dim: 64}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: A `GatedMultimodalUnit.Params`.
    """

    class Params(PluginParams):
        """Options of `GatedMultimodalUnit`."""

        dim: int = Field(default=64, ge=1, le=8192, description="Width of the fused vector.")

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        self.output_dim = params.dim
        self.hidden = nn.ModuleList(nn.Linear(width, params.dim, bias=False) for width in self.input_dims)
        self.gates = nn.Linear(sum(self.input_dims), params.dim * len(self.input_dims))

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, dim) tensor."""
        _validate_inputs(features, mask, self.input_dims)
        features = _zero_missing(features, mask)
        hidden = torch.stack([torch.tanh(h) for h in _project_each(self.hidden, features)], dim=1)
        # Gate logits: (batch, M, dim), one per modality and output dimension.
        logits = self.gates(torch.cat(features, dim=1)).reshape(-1, len(self.input_dims), self.output_dim)
        gates = _masked_softmax(logits, mask.unsqueeze(-1).expand_as(logits), dim=1)
        fused = (gates * hidden).sum(dim=1)
        return fused * mask.any(dim=1, keepdim=True)


class _CrossModalBlock(nn.Module):
    """Pre-norm cross-attention: target tokens query source tokens, then a feed-forward layer."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.target_norm = nn.LayerNorm(dim)
        self.source_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Update (batch, T, dim) target tokens from (batch, S, dim) source tokens."""
        tokens, dim = target.shape[1], target.shape[2]
        query = self.query(self.target_norm(target)).reshape(-1, tokens, self.heads, self.head_dim).transpose(1, 2)
        key_value = self.key_value(self.source_norm(source))
        key_value = key_value.reshape(-1, source.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(torch.matmul(query, key_value[0].transpose(-2, -1)) * self.scale, dim=-1)
        attended = torch.matmul(self.attention_dropout(weights), key_value[1]).transpose(1, 2).reshape(-1, tokens, dim)
        target = target + self.out(attended)
        return target + self.mlp(self.mlp_norm(target))


class CrossModalTransformerFusion(FusionPlugin):
    """Cross-modal transformer fusion in the manner of MulT: every modality attends to every other.

    Each modality embedding x_i becomes T tokens, t_i = reshape(W_i x_i + b_i) + P_i with a
    learned position embedding P_i. For every ordered pair (j, i), including j = i, a
    pre-norm cross-modal block lets the tokens of modality i query those of modality j,
    with no causal mask:

        u_ji = t_i + Out(softmax(Q(t_i) K(t_j)^T / sqrt(dim / heads)) V(t_j))
        y_ji = u_ji + MLP(LayerNorm(u_ji))

    Modality i's representation is the mean of y_ji over the present source modalities j,
    averaged over its T tokens and layer-normalised. The output concatenates the M
    representations, with zeros for the modalities a row lacks; its width is M * dim.

    Source: Tsai et al., "Multimodal Transformer for Unaligned Multimodal Language
    Sequences" (ACL 2019). It departs from MulT in three ways. The inputs are pooled
    embeddings, so each is expanded into T learned tokens instead of a time sequence. The
    self pair (j = i) is included, so a row with one modality still has a representation.
    The pairs are averaged, rather than concatenated and passed through a further
    self-attention transformer.

    Config example:

    ```yaml
    student:
      fusion:
        name: mult
        params: {dim: 32, heads: 4, tokens: 4, layers: 1, dropout: 0.1}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: A `CrossModalTransformerFusion.Params`.
    """

    class Params(PluginParams):
        """Options of `CrossModalTransformerFusion`."""

        dim: int = Field(default=32, ge=1, le=4096, description="Token width, a multiple of heads.")
        heads: int = Field(default=4, ge=1, le=64, description="Number of attention heads.")
        tokens: int = Field(default=4, ge=1, le=64, description="Tokens each modality embedding is expanded into.")
        layers: int = Field(default=1, ge=1, le=8, description="Cross-modal blocks applied in turn for each pair.")
        mlp_ratio: int = Field(default=2, ge=1, le=16, description="Feed-forward hidden width as a multiple of dim.")
        dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout on attention weights and feed-forward outputs.")

        @model_validator(mode="after")
        def _check_heads_divide_dim(self) -> CrossModalTransformerFusion.Params:
            if self.dim % self.heads != 0:
                raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}. Choose dim as a multiple of heads.")
            return self

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        count = len(self.input_dims)
        self.output_dim = count * params.dim
        self.projections = nn.ModuleList(nn.Linear(width, params.tokens * params.dim) for width in self.input_dims)
        self.positions = nn.Parameter(torch.empty(count, params.tokens, params.dim))
        nn.init.normal_(self.positions, std=0.02)
        # blocks[j * M + i][layer] carries modality j into modality i.
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                _CrossModalBlock(params.dim, params.heads, params.mlp_ratio, params.dropout) for _ in range(params.layers)
            )
            for _ in range(count * count)
        )
        self.final_norm = nn.LayerNorm(params.dim)

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, M * dim) tensor."""
        _validate_inputs(features, mask, self.input_dims)
        count, tokens, dim = len(self.input_dims), self.params.tokens, self.params.dim
        projected = _project_each(self.projections, _zero_missing(features, mask))
        streams = [p.reshape(-1, tokens, dim) + self.positions[i] for i, p in enumerate(projected)]

        present = mask.to(streams[0].dtype)
        outputs = []
        for i in range(count):
            total = torch.zeros_like(streams[i])
            for j in range(count):
                updated = streams[i]
                for block in self.blocks[j * count + i]:
                    updated = block(updated, streams[j])
                total = total + updated * present[:, j, None, None]
            # Mean over present sources; modality i itself is one of them wherever it is present.
            mean = total / present.sum(dim=1).clamp(min=1.0)[:, None, None]
            pooled = self.final_norm(mean.mean(dim=1))
            outputs.append(pooled * present[:, i : i + 1])
        return torch.cat(outputs, dim=1)


class TensorFusion(FusionPlugin):
    """Tensor fusion: the outer product of the modality embeddings, each extended by a 1.

    Formula, with z_i = W_i x_i + b_i of width `dim` (zero for a missing modality):

        Z = [z_1; 1] ⊗ [z_2; 1] ⊗ ... ⊗ [z_M; 1],   output = dropout(vec(Z))

    The appended 1 keeps every lower-order interaction, down to each z_i alone and a
    constant, so a row missing a modality keeps the terms of the others. The output width
    is (dim + 1)^M, so keep `dim` small. Source: Zadeh, Chen, Poria, Cambria & Morency,
    "Tensor Fusion Network for Multimodal Sentiment Analysis" (EMNLP 2017).

    Config example:

    ```yaml
    student:
      fusion:
        name: tensor
        params: {dim: 8, dropout: 0.1}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: A `TensorFusion.Params`.
    """

    class Params(PluginParams):
        """Options of `TensorFusion`."""

        dim: int = Field(default=8, ge=1, le=64, description="Width each modality is projected to before the product.")
        dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout probability on the fused vector.")

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        self.output_dim = (params.dim + 1) ** len(self.input_dims)
        if self.output_dim > 2**20:
            raise ValueError(
                f"Tensor fusion of {len(self.input_dims)} modalities at dim {params.dim} has "
                f"{self.output_dim} outputs, more than 2^20. Lower dim, or use lowrank fusion."
            )
        self.projections = nn.ModuleList(nn.Linear(width, params.dim) for width in self.input_dims)
        self.dropout = nn.Dropout(params.dropout)

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, (dim + 1)^M) tensor."""
        _validate_inputs(features, mask, self.input_dims)
        fused = None
        for index, projected in enumerate(_project_each(self.projections, _zero_missing(features, mask))):
            extended = torch.cat([projected * mask[:, index : index + 1], torch.ones_like(projected[:, :1])], dim=1)
            # Row-wise Kronecker product: (batch, a) and (batch, b) give (batch, a * b).
            fused = extended if fused is None else (fused.unsqueeze(2) * extended.unsqueeze(1)).flatten(1)
        assert fused is not None
        return self.dropout(fused)


class LowRankFusion(FusionPlugin):
    """Low-rank multimodal fusion: tensor fusion followed by a linear map of rank r, never built.

    Formula, with z_i = W_i x_i + b_i as in tensor fusion and [z_i; 1] extended by a 1:

        h = sum_{k=1..r} w_k * prod_i (A_i^(k) [z_i; 1]) + c

    where each A_i^(k) is a (dim_out, dim + 1) factor and the product is elementwise. This
    equals a linear map of vec([z_1; 1] ⊗ ... ⊗ [z_M; 1]) whose weight tensor has rank r,
    at a cost linear in M. Source: Liu, Shen, Lakshminarayanan, Zadeh & Morency,
    "Efficient Low-rank Multimodal Fusion with Modality-Specific Factors" (ACL 2018).

    Config example:

    ```yaml
    student:
      fusion:
        name: lowrank
        params: {dim: 16, output_dim: 64, rank: 4}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: A `LowRankFusion.Params`.
    """

    class Params(PluginParams):
        """Options of `LowRankFusion`."""

        dim: int = Field(default=16, ge=1, le=4096, description="Width each modality is projected to.")
        output_dim: int = Field(default=64, ge=1, le=8192, description="Width of the fused vector.")
        rank: int = Field(default=4, ge=1, le=256, description="Rank r of the fusion weight tensor.")

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        self.output_dim = params.output_dim
        self.projections = nn.ModuleList(nn.Linear(width, params.dim) for width in self.input_dims)
        # factors[i]: (rank, dim + 1, output_dim), one factor per modality and rank.
        self.factors = nn.ParameterList(
            nn.Parameter(torch.randn(params.rank, params.dim + 1, params.output_dim) / math.sqrt(params.dim + 1))
            for _ in self.input_dims
        )
        self.rank_weights = nn.Parameter(torch.full((params.rank,), 1.0 / params.rank))
        self.bias = nn.Parameter(torch.zeros(params.output_dim))

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, output_dim) tensor."""
        _validate_inputs(features, mask, self.input_dims)
        product = None
        for index, projected in enumerate(_project_each(self.projections, _zero_missing(features, mask))):
            extended = torch.cat([projected * mask[:, index : index + 1], torch.ones_like(projected[:, :1])], dim=1)
            # (batch, dim + 1) x (rank, dim + 1, out) -> (batch, rank, out)
            factor = torch.einsum("bd,rdo->bro", extended, self.factors[index])
            product = factor if product is None else product * factor
        assert product is not None
        return torch.einsum("bro,r->bo", product, self.rank_weights) + self.bias


class CovarianceFusion(FusionPlugin):
    """Second-order fusion: per-example cross-covariances of the modalities, square-rooted and normalised.

    Formula, with z_i = W_i x_i + b_i of width `dim` (zero for a missing modality), for each
    pair i <= j:

        C_ij = z_i z_j^T,   S_ij = C_ij / sqrt(|C_ij| + eps),   v_ij = vec(S_ij) / ||vec(S_ij)||_2

    and the output concatenates the v_ij. S_ij is the signed square root sign(C) sqrt(|C|)
    of bilinear pooling, smoothed by eps so its gradient stays finite at 0; the L2
    normalisation follows it, as in Lin, RoyChowdhury & Maji, "Bilinear CNN Models for
    Fine-grained Visual Recognition" (ICCV 2015). The self pairs (i = j) keep a row with
    one modality informative. A pair with a missing modality contributes zeros. The
    output width is M (M + 1) / 2 * dim^2.

    Config example:

    ```yaml
    student:
      fusion:
        name: covariance
        params: {dim: 16}
    ```

    Args:
        input_dims: Embedding width of each modality, in config order.
        params: A `CovarianceFusion.Params`.
    """

    class Params(PluginParams):
        """Options of `CovarianceFusion`."""

        dim: int = Field(default=16, ge=1, le=256, description="Width each modality is projected to.")
        eps: float = Field(default=1e-6, gt=0.0, le=1.0, description="Smoothing of the signed square root.")

    params: Params

    def __init__(self, input_dims: Sequence[int], params: Params) -> None:
        super().__init__(input_dims, params)
        count = len(self.input_dims)
        self.pairs = [(i, j) for i in range(count) for j in range(i, count)]
        self.output_dim = len(self.pairs) * params.dim**2
        self.projections = nn.ModuleList(nn.Linear(width, params.dim) for width in self.input_dims)

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Fuse the modalities into a (batch, M (M + 1) / 2 * dim^2) tensor."""
        _validate_inputs(features, mask, self.input_dims)
        projected = [
            tensor * mask[:, index : index + 1]
            for index, tensor in enumerate(_project_each(self.projections, _zero_missing(features, mask)))
        ]
        parts = []
        for i, j in self.pairs:
            outer = (projected[i].unsqueeze(2) * projected[j].unsqueeze(1)).flatten(1)
            rooted = outer / torch.sqrt(outer.abs() + self.params.eps)
            parts.append(F.normalize(rooted, dim=1))
        return torch.cat(parts, dim=1)
