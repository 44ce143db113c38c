"""Built-in fusion plugins: early fusion by concatenation and cross-modal attention.

Both take one (batch, input_dims[m]) tensor per modality and a (batch, modalities) bool
mask, True where the row has that modality. Features of a missing modality are replaced
by zeros before any computation, so even NaN placeholders cannot reach the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import nn

from mmkd.plugin_api import FusionPlugin, PluginParams

__all__ = ["AttentionFusion", "ConcatFusion"]


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
    the row has modality i and 0 otherwise. The output width is sum(input_dims).

    Config example:

    ```yaml
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
