"""Built-in alignment plugins: TCA, CORAL, Deep CORAL, CCA, Deep CCA, CLIP, Procrustes, CAAN.

Each plugin maps a (batch, source_dim) source and a (batch, target_dim) target, such as
student and teacher embeddings or the embeddings of two modalities, to a scalar loss:

```yaml
distill:
  alignment:
    - {name: deep_coral, weight: 0.5}
```

The target is a reference, so every plugin detaches it, and no gradient reaches the
teacher or the feature store it was read from. Parameters that a plugin owns, such as its
projections or its temperature, are trained with the source model.

TCA, CORAL, linear CCA and Procrustes also have a closed-form `fit(source, target)`,
which runs on stored features without gradients, and `transform(source)`, which applies
the fitted map to new samples. Their matrix decompositions run in float64, and their
results come back in the dtype of the input.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mmkd.plugin_api import AlignmentPlugin, PluginParams

__all__ = [
    "CAANAlignment",
    "CCAAlignment",
    "CLIPAlignment",
    "CORALAlignment",
    "DeepCCAAlignment",
    "DeepCORALAlignment",
    "ProcrustesAlignment",
    "TCAAlignment",
]


# Shared checks and linear algebra


def _check_features(
    name: str,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    source_dim: int,
    target_dim: int,
    paired: bool,
    min_rows: int,
) -> None:
    """Raise ValueError unless source and target are 2-D with the built widths and enough rows."""
    if (
        source.dim() != 2
        or target.dim() != 2
        or source.shape[1] != source_dim
        or target.shape[1] != target_dim
    ):
        raise ValueError(
            f"The {name} alignment was built for source_dim {source_dim} and target_dim "
            f"{target_dim}, but got a source of shape {tuple(source.shape)} and a target of "
            f"shape {tuple(target.shape)}. Pass (batch, {source_dim}) and (batch, {target_dim}) "
            "tensors."
        )
    if paired and source.shape[0] != target.shape[0]:
        raise ValueError(
            f"The {name} alignment pairs source row i with target row i, but the source has "
            f"{source.shape[0]} rows and the target has {target.shape[0]}. Pass paired "
            "batches of equal size."
        )
    if min(source.shape[0], target.shape[0]) < min_rows:
        raise ValueError(
            f"The {name} alignment needs at least {min_rows} rows on each side, but got "
            f"{source.shape[0]} source rows and {target.shape[0]} target rows. Use a larger "
            "batch."
        )


def _check_width(name: str, features: torch.Tensor, width: int, side: str) -> None:
    """Raise ValueError unless `features` is (batch, width)."""
    if features.dim() != 2 or features.shape[1] != width:
        raise ValueError(
            f"The {name} alignment expected {side} features of shape (batch, {width}), got "
            f"{tuple(features.shape)}."
        )


def _require_equal_widths(name: str, source_dim: int, target_dim: int, reason: str) -> None:
    if source_dim != target_dim:
        raise ValueError(
            f"The {name} alignment needs equal widths because {reason}, but source_dim is "
            f"{source_dim} and target_dim is {target_dim}. Project one side first, or use "
            "deep_coral, dcca or clip, which learn a projection."
        )


def _not_fitted_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"The {name} alignment has not been fitted. Call fit(source, target) on stored "
        "features before transform()."
    )


def _covariance(features: torch.Tensor) -> torch.Tensor:
    """Return the covariance of the rows, with the unbiased n - 1 denominator."""
    centred = features - features.mean(dim=0, keepdim=True)
    return centred.T @ centred / (features.shape[0] - 1)


def _cholesky(
    matrix: torch.Tensor,
    name: str,
    matrix_name: str,
    fix: str = "Raise eps, or use more rows than the feature width.",
) -> torch.Tensor:
    """Return the lower Cholesky factor, or raise ValueError naming the matrix that is not definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info.item()) != 0:
        raise ValueError(
            f"The {name} alignment found the {matrix_name} ({tuple(matrix.shape)}) singular or "
            f"not positive definite. {fix}"
        )
    return factor


def _symmetric_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    """Return matrix^power for a symmetric positive definite matrix, via its eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    eigenvalues = eigenvalues.clamp(min=torch.finfo(matrix.dtype).tiny)
    return (eigenvectors * eigenvalues.pow(power)) @ eigenvectors.T


def _whitened_cross_covariance(
    source: torch.Tensor, target: torch.Tensor, eps: float, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return T = L_s^-1 S_st L_t^-T and the Cholesky factors L_s, L_t of the regularised covariances.

    S_ss = L_s L_s^T and S_tt = L_t L_t^T are the covariances plus eps * I. T differs from
    S_ss^-1/2 S_st S_tt^-1/2 only by orthogonal factors on each side, so both have the
    same singular values, the canonical correlations. Triangular solves keep the
    gradient free of the 1 / (lambda_i - lambda_j) terms of an eigendecomposition.
    """
    rows = source.shape[0]
    source_centred = source - source.mean(dim=0, keepdim=True)
    target_centred = target - target.mean(dim=0, keepdim=True)
    source_eye = torch.eye(source.shape[1], dtype=source.dtype, device=source.device)
    target_eye = torch.eye(target.shape[1], dtype=target.dtype, device=target.device)
    sigma_ss = source_centred.T @ source_centred / (rows - 1) + eps * source_eye
    sigma_tt = target_centred.T @ target_centred / (rows - 1) + eps * target_eye
    sigma_st = source_centred.T @ target_centred / (rows - 1)

    source_factor = _cholesky(sigma_ss, name, "regularised source covariance")
    target_factor = _cholesky(sigma_tt, name, "regularised target covariance")
    left = torch.linalg.solve_triangular(source_factor, sigma_st, upper=False)
    whitened = torch.linalg.solve_triangular(target_factor, left.T, upper=False).T
    return whitened, source_factor, target_factor


def _coral_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return ||C_s - C_t||_F^2 / (4 d^2) for two (rows, d) feature matrices."""
    width = source.shape[1]
    difference = _covariance(source) - _covariance(target)
    return difference.pow(2).sum() / (4.0 * width**2)


class _FittedAlignment(AlignmentPlugin):
    """Base of the closed-form plugins, whose fit is stored in buffers that are None until `fit` runs.

    A None buffer is left out of the state dict, and `load_state_dict` would reject the
    stored fit as unexpected keys. Loading therefore first allocates each fitted buffer
    that the state dict contains, with the stored shape and dtype, and then copies it.
    """

    fit_buffers: tuple[str, ...] = ()

    def __init__(self, params: PluginParams, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        for name in self.fit_buffers:
            self.register_buffer(name, None)

    def _fitted(self, name: str) -> torch.Tensor:
        """Return a fitted buffer in float64, even after `.to(dtype)` converted the module."""
        return getattr(self, name).to(torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        for name in self.fit_buffers:
            stored = state_dict.get(prefix + name)
            if stored is not None and self._buffers[name] is None:
                self._buffers[name] = torch.empty_like(stored)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# TCA


def _kernel_matrix(
    left: torch.Tensor, right: torch.Tensor, kernel: str, gamma: float
) -> torch.Tensor:
    """Return the (rows of left, rows of right) kernel matrix."""
    if kernel == "linear":
        return left @ right.T
    # Squared distances come from ||x||^2 - 2 x^T y + ||y||^2, so no square root, with its
    # infinite slope at zero distance, enters the gradient.
    squared = (
        left.pow(2).sum(dim=1, keepdim=True) - 2.0 * left @ right.T + right.pow(2).sum(dim=1)
    ).clamp(min=0.0)
    return torch.exp(-gamma * squared)


class TCAAlignment(_FittedAlignment):
    """Transfer Component Analysis: a kernel subspace in which the two domains' means meet.

    The fitted samples X = [source; target] (n = n_s + n_t rows) give the kernel matrix K,
    the centring matrix H = I - 11^T / n and the MMD matrix L = e e^T, where e_i = 1 / n_s
    for source rows and -1 / n_t for target rows. The transfer components W (n, m) solve

        min_W tr(W^T K L K W) + mu tr(W^T W)  subject to  W^T K H K W = I

    so the columns of W are the m leading eigenvectors of (K L K + mu I)^-1 K H K, scaled
    to meet the constraint. A sample x is embedded as z(x) = k(x, X) W, with k(x, X) the
    kernel row against the fitted samples, and the embedding of the fitted samples is
    K W. The loss is the squared MMD of the latent batches under a linear kernel:

        loss = || mean_b z(s_b) - mean_b z(t_b) ||^2

    It is differentiable with respect to the source through k(s_b, X). W does not change
    in training. `forward` uses the map from `fit` when there is one, and otherwise
    solves the eigenproblem on the detached batch for that call only.

    Source: Pan, Tsang, Kwok & Yang, "Domain Adaptation via Transfer Component Analysis"
    (IEEE Transactions on Neural Networks 22(2), 2011), the unsupervised variant. Both
    domains must share one feature space, so source_dim must equal target_dim. Project
    one side first, or use a plugin with a learned projection. The linear kernel is
    k(x, y) = x^T y and the RBF kernel is exp(-gamma ||x - y||^2).

    `fit` costs O(n^3) time and O(n^2) memory. Subsample stored features beyond a few
    thousand rows.

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: tca, weight: 0.5, params: {kernel: rbf, gamma: 0.05, mu: 1.0, components: 8}}
    ```

    Args:
        params: A `TCAAlignment.Params`.
        source_dim: Width of the source features.
        target_dim: Width of the target features, equal to source_dim.

    Raises:
        ValueError: The widths differ, or the linear kernel cannot give `components`
            directions because components exceeds source_dim.
    """

    class Params(PluginParams):
        """Options of `TCAAlignment`."""

        kernel: Literal["linear", "rbf"] = Field(
            default="linear", description="Kernel k: linear (x^T y) or rbf (exp(-gamma ||x - y||^2))."
        )
        gamma: float | None = Field(
            default=None,
            gt=0.0,
            le=1e6,
            description="RBF width gamma. None uses 1 / source_dim. Only valid with kernel rbf.",
        )
        mu: float = Field(
            default=1.0, gt=0.0, le=1e6, description="Weight mu of the regulariser tr(W^T W)."
        )
        components: int = Field(
            default=8, ge=1, le=4096, description="Number m of transfer components, the latent width."
        )

        @model_validator(mode="after")
        def _check_gamma_needs_rbf(self) -> TCAAlignment.Params:
            if self.gamma is not None and self.kernel != "rbf":
                raise ValueError(
                    f"gamma applies only to kernel rbf, but kernel is {self.kernel}. Remove "
                    "gamma or set kernel: rbf."
                )
            return self

    params: Params
    fit_buffers = ("fitted_samples", "projection", "eigenvalues", "embedding")

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        _require_equal_widths(
            "tca", source_dim, target_dim, "one kernel compares samples of both domains"
        )
        if params.kernel == "linear" and params.components > source_dim:
            raise ValueError(
                f"The tca alignment with kernel linear has at most source_dim ({source_dim}) "
                f"informative components, but components is {params.components}. Lower "
                "components or use kernel: rbf."
            )
        self.gamma = params.gamma if params.gamma is not None else 1.0 / source_dim

    def _kernel(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return _kernel_matrix(left, right, self.params.kernel, self.gamma)

    def _solve(
        self, source: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the samples, the components W (n, m) and their eigenvalues, without gradients."""
        samples = torch.cat([source, target]).detach().to(torch.float64)
        source_rows, target_rows = source.shape[0], target.shape[0]
        rows = source_rows + target_rows
        components = self.params.components
        # Centring leaves at most n - 1 directions with nonzero scatter.
        if components > rows - 1:
            raise ValueError(
                f"The tca alignment needs more than components ({components}) samples in all, "
                f"but got {source_rows} source and {target_rows} target rows. Fit on more rows "
                "or lower components."
            )

        kernel = self._kernel(samples, samples)
        options = {"dtype": torch.float64, "device": samples.device}
        indicator = torch.cat(
            [
                torch.full((source_rows,), 1.0 / source_rows, **options),
                torch.full((target_rows,), -1.0 / target_rows, **options),
            ]
        )
        mmd_matrix = torch.outer(indicator, indicator)
        centring = torch.eye(rows, **options) - 1.0 / rows
        scatter = kernel @ centring @ kernel
        discrepancy = kernel @ mmd_matrix @ kernel + self.params.mu * torch.eye(rows, **options)

        # scatter w = lambda discrepancy w is a symmetric-definite generalised problem. With
        # discrepancy = C C^T it becomes the symmetric problem (C^-1 scatter C^-T) y = lambda y,
        # and w = C^-T y.
        factor = _cholesky(discrepancy, "tca", "matrix K L K + mu I", fix="Raise mu.")
        half = torch.linalg.solve_triangular(factor, scatter, upper=False)
        reduced = torch.linalg.solve_triangular(factor, half.T, upper=False)
        reduced = (reduced + reduced.T) / 2.0
        all_eigenvalues, vectors = torch.linalg.eigh(reduced)
        eigenvalues = all_eigenvalues.flip(0)[:components]
        vectors = vectors.flip(1)[:, :components]
        # Relative to the largest eigenvalue, 1e-10 is rounding noise in float64.
        threshold = 1e-10 * eigenvalues[0].clamp(min=torch.finfo(torch.float64).tiny)
        informative = int((eigenvalues > threshold).sum())
        if informative < components:
            raise ValueError(
                f"The tca alignment found only {informative} components with nonzero scatter, "
                f"fewer than components ({components}). Lower components."
            )

        # eigh returns y^T y = 1, so w^T discrepancy w = 1 and w^T scatter w = lambda.
        # Dividing by sqrt(lambda) meets the TCA constraint W^T K H K W = I of Pan et al.
        weights = torch.linalg.solve_triangular(factor.T, vectors, upper=True)
        weights = weights / eigenvalues.sqrt()
        return samples, weights, eigenvalues

    @torch.no_grad()
    def fit(self, source: torch.Tensor, target: torch.Tensor) -> TCAAlignment:
        """Solve for the transfer components on stored source and target features and return self.

        Afterwards `fitted_samples` (n, d), `projection` W (n, m), `eigenvalues` (m,) and
        `embedding` K W (n, m) contain the fit, in float64.
        """
        _check_features(
            "tca",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=False,
            min_rows=1,
        )
        samples, weights, eigenvalues = self._solve(source, target)
        self.fitted_samples = samples
        self.projection = weights
        self.eigenvalues = eigenvalues
        self.embedding = self._kernel(samples, samples) @ weights
        return self

    def transform(self, source: torch.Tensor) -> torch.Tensor:
        """Embed (batch, source_dim) samples of either domain into the (batch, components) latent space."""
        if self.projection is None:
            raise _not_fitted_error("tca")
        _check_width("tca", source, self.source_dim, "source")
        samples, weights = self._fitted("fitted_samples"), self._fitted("projection")
        latent = self._kernel(source.to(torch.float64), samples) @ weights
        return latent.to(source.dtype)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the squared MMD between the latent source and target batches."""
        _check_features(
            "tca",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=False,
            min_rows=1,
        )
        if self.projection is not None:
            samples, weights = self._fitted("fitted_samples"), self._fitted("projection")
        else:
            samples, weights, _ = self._solve(source, target)

        source_latent = self._kernel(source.to(torch.float64), samples) @ weights
        target_latent = self._kernel(target.detach().to(torch.float64), samples) @ weights
        gap = source_latent.mean(dim=0) - target_latent.mean(dim=0)
        return gap.pow(2).sum().to(source.dtype)


# CORAL


class CORALAlignment(_FittedAlignment):
    """CORAL: whiten the source covariance and recolour it with the target covariance.

    `fit` computes, from stored features, the regularised covariances C_s = cov(S) + eps I
    and C_t = cov(T) + eps I, both with the n - 1 denominator, and the map

        A = C_s^-1/2 C_t^1/2,  so that  A^T C_s A = C_t

    `transform` applies it as (x - mean_s) A + mean_t. Centring on the source mean and
    adding the target mean is this plugin's choice, so that the mean matches as well as
    the covariance. With `recenter: false` it returns x A, as Sun et al. do for features
    that are already standardised. The raw covariance of the recoloured source is
    C_t - eps A^T A, which equals cov(T) up to a term that vanishes with eps.

    The loss is the CORAL distance of the raw batches, which does not use the fitted map:

        loss = || cov(source) - cov(target) ||_F^2 / (4 d^2)

    It is the Deep CORAL loss without a projection, so it needs equal widths. Use
    `deep_coral` for unequal widths.

    Source: Sun, Feng & Saenko, "Return of Frustratingly Easy Domain Adaptation" (AAAI
    2016). The default eps = 1 adds the identity to both covariances, which suits
    standardised features. Lower it for features with much smaller variances.

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: coral, weight: 0.5, params: {eps: 1.0, recenter: true}}
    ```

    Args:
        params: A `CORALAlignment.Params`.
        source_dim: Width of the source features.
        target_dim: Width of the target features, equal to source_dim.

    Raises:
        ValueError: The two widths differ.
    """

    class Params(PluginParams):
        """Options of `CORALAlignment`."""

        eps: float = Field(
            default=1.0,
            gt=0.0,
            le=1e6,
            description="Ridge eps added to the diagonal of both covariances in fit.",
        )
        recenter: bool = Field(
            default=True,
            description=(
                "In transform, subtract the source mean before the map and add the target "
                "mean after it."
            ),
        )

    params: Params
    fit_buffers = ("coral_map", "source_mean", "target_mean")

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        _require_equal_widths(
            "coral", source_dim, target_dim, "the map recolours source features as target features"
        )

    @torch.no_grad()
    def fit(self, source: torch.Tensor, target: torch.Tensor) -> CORALAlignment:
        """Compute the whitening and recolouring map from stored features and return self.

        Afterwards `coral_map` A (d, d), `source_mean` and `target_mean` (d,) contain the fit,
        in float64.
        """
        _check_features(
            "coral",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=False,
            min_rows=2,
        )
        source = source.detach().to(torch.float64)
        target = target.detach().to(torch.float64)
        eye = torch.eye(self.source_dim, dtype=torch.float64, device=source.device)
        source_covariance = _covariance(source) + self.params.eps * eye
        target_covariance = _covariance(target) + self.params.eps * eye

        self.coral_map = _symmetric_power(source_covariance, -0.5) @ _symmetric_power(
            target_covariance, 0.5
        )
        self.source_mean = source.mean(dim=0)
        self.target_mean = target.mean(dim=0)
        return self

    def transform(self, source: torch.Tensor) -> torch.Tensor:
        """Recolour (batch, d) source features with the fitted map."""
        if self.coral_map is None:
            raise _not_fitted_error("coral")
        _check_width("coral", source, self.source_dim, "source")
        features = source.to(torch.float64)
        coral_map = self._fitted("coral_map")
        if self.params.recenter:
            centred = features - self._fitted("source_mean")
            recoloured = centred @ coral_map + self._fitted("target_mean")
        else:
            recoloured = features @ coral_map
        return recoloured.to(source.dtype)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the CORAL distance between the batch covariances."""
        _check_features(
            "coral",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=False,
            min_rows=2,
        )
        return _coral_distance(source, target.detach())


class DeepCORALAlignment(AlignmentPlugin):
    """Deep CORAL loss: the distance between the source and target batch covariances.

    Formula, with C the covariance of a batch (n - 1 denominator) and d = target_dim:

        loss = || C(P source) - C(target) ||_F^2 / (4 d^2)

    P is a learned bias-free linear map from source_dim to target_dim when the widths
    differ or `projection` is true, and the identity otherwise. It has no bias because
    covariance ignores a constant shift, so a bias would never get a gradient. The batch
    needs at least two rows on each side, and the two batch sizes may differ.

    Source: Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation"
    (ECCV 2016 Workshops). The paper compares activations of one layer of a network that
    both domains share, so the widths are equal and there is no projection. The
    projection here is this plugin's addition for features of unequal widths. A learned map can shrink or stretch the source covariance freely, so train it
    with the other distillation terms, not alone.

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: deep_coral, weight: 0.5, params: {projection: false}}
    ```

    Args:
        params: A `DeepCORALAlignment.Params`.
        source_dim: Width of the source features.
        target_dim: Width of the target features.
    """

    class Params(PluginParams):
        """Options of `DeepCORALAlignment`."""

        projection: bool = Field(
            default=False,
            description=(
                "Learn a linear map from source_dim to target_dim even when they are equal. "
                "Unequal widths always get one."
            ),
        )

    params: Params

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        self.projection: nn.Module
        if params.projection or source_dim != target_dim:
            self.projection = nn.Linear(source_dim, target_dim, bias=False)
        else:
            self.projection = nn.Identity()

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the Deep CORAL loss of the projected source batch and the target batch."""
        _check_features(
            "deep_coral",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=False,
            min_rows=2,
        )
        return _coral_distance(self.projection(source), target.detach())


# CCA


class CCAAlignment(_FittedAlignment):
    """Linear canonical correlation analysis between paired source and target features.

    With centred features and covariances S_ss + eps I, S_tt + eps I and S_st (n - 1
    denominator), the canonical correlations rho_1 >= rho_2 >= ... are the singular
    values of

        T = (S_ss + eps I)^-1/2 S_st (S_tt + eps I)^-1/2

    The plugin computes them with Cholesky factors instead of symmetric square roots.
    That changes T only by orthogonal factors, so the singular values are the same.

    `fit` stores the top-k direction pairs A (source_dim, k) and B (target_dim, k), for
    which A^T (S_ss + eps I) A = I, B^T (S_tt + eps I) B = I and A^T S_st B = diag(rho).
    `transform(x)` returns (x - mean_s) A and `transform_target(y)` returns
    (y - mean_t) B. The loss does not use the fit. It is the negative sum of the top-k
    canonical correlations of the batch, differentiable with respect to the source:

        loss = -(rho_1 + ... + rho_k)

    With a small eps, a batch with fewer rows than either width gives correlations near 1
    whatever the data, so use batches much larger than both widths, or a larger eps.

    Source: Hotelling, "Relations Between Two Sets of Variates" (Biometrika 28, 321-377,
    1936). The ridge eps follows the regularised covariances of Andrew et al. (ICML 2013).

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: cca, weight: 0.5, params: {components: 8, eps: 1.0e-3}}
    ```

    Args:
        params: A `CCAAlignment.Params`.
        source_dim: Width of the source features.
        target_dim: Width of the target features.

    Raises:
        ValueError: `components` exceeds min(source_dim, target_dim).
    """

    class Params(PluginParams):
        """Options of `CCAAlignment`."""

        components: int | None = Field(
            default=None,
            ge=1,
            le=8192,
            description="Number k of canonical pairs. None uses min(source_dim, target_dim).",
        )
        eps: float = Field(
            default=1e-3,
            ge=0.0,
            le=1e6,
            description="Ridge eps added to the diagonal of both covariances.",
        )

    params: Params
    fit_buffers = (
        "source_mean",
        "target_mean",
        "source_directions",
        "target_directions",
        "correlations",
    )

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        self.components = _resolve_components("cca", params.components, min(source_dim, target_dim))

    def _check(self, source: torch.Tensor, target: torch.Tensor) -> None:
        _check_features(
            "cca",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=True,
            min_rows=2,
        )

    @torch.no_grad()
    def fit(self, source: torch.Tensor, target: torch.Tensor) -> CCAAlignment:
        """Compute the top-k canonical directions from stored paired features and return self.

        Afterwards `source_directions` A, `target_directions` B, `correlations` (k,) and
        the two means contain the fit, in float64.
        """
        self._check(source, target)
        source = source.detach().to(torch.float64)
        target = target.detach().to(torch.float64)
        whitened, source_factor, target_factor = _whitened_cross_covariance(
            source, target, self.params.eps, "cca"
        )
        left, singular_values, right_transposed = torch.linalg.svd(whitened, full_matrices=False)
        k = self.components

        # A whitened source row z = L_s^-1 x has canonical variates U^T z, so the source
        # directions are L_s^-T U. Likewise, the target directions are L_t^-T V.
        self.source_directions = torch.linalg.solve_triangular(
            source_factor.T, left[:, :k], upper=True
        )
        self.target_directions = torch.linalg.solve_triangular(
            target_factor.T, right_transposed[:k].T, upper=True
        )
        self.correlations = singular_values[:k]
        self.source_mean = source.mean(dim=0)
        self.target_mean = target.mean(dim=0)
        return self

    def transform(self, source: torch.Tensor) -> torch.Tensor:
        """Project (batch, source_dim) features onto the k source canonical directions."""
        if self.source_directions is None:
            raise _not_fitted_error("cca")
        _check_width("cca", source, self.source_dim, "source")
        centred = source.to(torch.float64) - self._fitted("source_mean")
        projected = centred @ self._fitted("source_directions")
        return projected.to(source.dtype)

    def transform_target(self, target: torch.Tensor) -> torch.Tensor:
        """Project (batch, target_dim) features onto the k target canonical directions."""
        if self.target_directions is None:
            raise _not_fitted_error("cca")
        _check_width("cca", target, self.target_dim, "target")
        centred = target.to(torch.float64) - self._fitted("target_mean")
        projected = centred @ self._fitted("target_directions")
        return projected.to(target.dtype)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute minus the sum of the batch's top-k canonical correlations."""
        self._check(source, target)
        whitened, _, _ = _whitened_cross_covariance(
            source.to(torch.float64), target.detach().to(torch.float64), self.params.eps, "cca"
        )
        correlations = torch.linalg.svdvals(whitened)
        return -correlations[: self.components].sum().to(source.dtype)


def _resolve_components(name: str, components: int | None, maximum: int) -> int:
    """Return `components`, or `maximum` when it is None, and raise ValueError when it is too large."""
    if components is None:
        return maximum
    if components > maximum:
        raise ValueError(
            f"The {name} alignment has at most {maximum} canonical pairs here, but components "
            f"is {components}. Lower components to {maximum} or less."
        )
    return components


class DeepCCAAlignment(AlignmentPlugin):
    """Deep CCA loss: negative total canonical correlation of learned projections.

    Both sides pass through a learned bias-free linear map to `dim` channels,
    H_s = W_s source and H_t = W_t target. With their centred covariances (n - 1
    denominator) and the ridge eps,

        S_ss = cov(H_s) + eps I,  S_tt = cov(H_t) + eps I,  S_st = cross-cov(H_s, H_t)
        T = S_ss^-1/2 S_st S_tt^-1/2
        loss = -(sum of the top-k singular values of T)

    With k = dim this is minus the trace norm of T, the total correlation. T is computed
    with Cholesky factors instead of symmetric square roots, which gives the same singular
    values and a stabler gradient. The maps have no bias because centring removes it.

    Source: Andrew, Arora, Bilmes & Livescu, "Deep Canonical Correlation Analysis" (ICML
    2013), which uses the same T, covariances and ridge. The paper trains a deep network
    per view. Here the source network is whatever produces `source`, and each side ends
    in a linear map owned by this plugin. The target side is therefore linear in the
    given target features.

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: dcca, weight: 0.5, params: {dim: 32, components: 16, eps: 1.0e-3}}
    ```

    Args:
        params: A `DeepCCAAlignment.Params`.
        source_dim: Width of the source features.
        target_dim: Width of the target features.

    Raises:
        ValueError: `components` exceeds `dim`.
    """

    class Params(PluginParams):
        """Options of `DeepCCAAlignment`."""

        dim: int = Field(
            default=32, ge=1, le=8192, description="Output width o of both learned projections."
        )
        components: int | None = Field(
            default=None,
            ge=1,
            le=8192,
            description="Number k of canonical correlations in the loss. None uses all dim.",
        )
        eps: float = Field(
            default=1e-3,
            gt=0.0,
            le=1e6,
            description="Ridge eps added to the diagonal of both covariances.",
        )

    params: Params

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        self.components = _resolve_components("dcca", params.components, params.dim)
        self.source_projection = nn.Linear(source_dim, params.dim, bias=False)
        self.target_projection = nn.Linear(target_dim, params.dim, bias=False)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute minus the sum of the top-k canonical correlations of the projected batch."""
        _check_features(
            "dcca",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=True,
            min_rows=2,
        )
        source_projected = self.source_projection(source).to(torch.float64)
        target_projected = self.target_projection(target.detach()).to(torch.float64)
        whitened, _, _ = _whitened_cross_covariance(
            source_projected, target_projected, self.params.eps, "dcca"
        )
        correlations = torch.linalg.svdvals(whitened)
        return -correlations[: self.components].sum().to(source.dtype)


# CLIP


class CLIPAlignment(AlignmentPlugin):
    """CLIP-style contrastive alignment: symmetric InfoNCE over the batch with a learned temperature.

    Both sides pass through a learned bias-free linear map to `dim` channels and are
    scaled to unit L2 norm, giving rows s_i and t_j. With the logit scale
    c = min(exp(logit_scale), max_logit_scale):

        logits_ij = c * s_i^T t_j
        loss = (CE(logits, labels) + CE(logits^T, labels)) / 2,  labels = 0, 1, ..., B - 1

    Row i of the source and row i of the target are the positive pair, and every other
    row of the batch is a negative. `logit_scale` is a learned parameter that stores
    log(1 / temperature). It starts at log(1 / initial_temperature).

    Source: Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision" (ICML 2021), which starts the temperature at 0.07 and clips it so that
    the logits are never scaled by more than 100. Here the clamp applies to the scale in
    `forward` and leaves the parameter as it is. Above the limit the parameter therefore
    gets no gradient from this loss, and it stays there until another term or weight
    decay moves it.

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: clip, weight: 0.5, params: {dim: 128, initial_temperature: 0.07, max_logit_scale: 100.0}}
    ```

    Args:
        params: A `CLIPAlignment.Params`.
        source_dim: Width of the source features.
        target_dim: Width of the target features.
    """

    class Params(PluginParams):
        """Options of `CLIPAlignment`."""

        dim: int = Field(
            default=128, ge=1, le=8192, description="Width of the shared embedding space."
        )
        initial_temperature: float = Field(
            default=0.07, gt=0.0, le=100.0, description="Softmax temperature at initialisation."
        )
        max_logit_scale: float = Field(
            default=100.0,
            ge=1.0,
            le=1e4,
            description="Upper limit of the logit scale 1 / temperature used in forward.",
        )

        @model_validator(mode="after")
        def _check_initial_scale_within_limit(self) -> CLIPAlignment.Params:
            if 1.0 / self.initial_temperature > self.max_logit_scale:
                raise ValueError(
                    f"initial_temperature {self.initial_temperature} gives a logit scale of "
                    f"{1.0 / self.initial_temperature:g}, above max_logit_scale "
                    f"{self.max_logit_scale}. Raise initial_temperature to at least "
                    f"{1.0 / self.max_logit_scale:g}."
                )
            return self

    params: Params

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        self.source_projection = nn.Linear(source_dim, params.dim, bias=False)
        self.target_projection = nn.Linear(target_dim, params.dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / params.initial_temperature)))

    def logits(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the (batch, batch) scaled cosine similarities, source rows against target rows."""
        source_embedding = F.normalize(self.source_projection(source), dim=-1)
        target_embedding = F.normalize(self.target_projection(target.detach()), dim=-1)
        scale = self.logit_scale.exp().clamp(max=self.params.max_logit_scale)
        return scale * source_embedding @ target_embedding.T

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the symmetric InfoNCE loss of the paired batch."""
        _check_features(
            "clip",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=True,
            min_rows=1,
        )
        logits = self.logits(source, target)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2.0


# Procrustes


def _pad_columns(features: torch.Tensor, width: int) -> torch.Tensor:
    """Return `features` with zero columns appended up to `width`."""
    return F.pad(features, (0, width - features.shape[1]))


class ProcrustesAlignment(_FittedAlignment):
    """Orthogonal Procrustes: the rotation or reflection that best maps source rows onto target rows.

    For paired rows X (n, d) and Y (n, d) the solution of

        min_R || X R - Y ||_F  subject to  R^T R = I

    is R = U V^T, where U S V^T is the SVD of X^T Y. When the widths differ, the narrower
    side gets zero columns up to D = max(source_dim, target_dim), and R is D x D. With
    `center`, both sides are centred on their own means first, and `transform` adds the
    target mean back.

    `fit` solves for R on stored features. `transform(x)` returns x R cut to the first
    target_dim columns, plus the target mean with `center`. The loss refits R on each
    detached batch and returns the mean squared residual of that batch:

        loss = 1 / B * sum_b || x_b R - y_b ||^2

    No gradient flows through the SVD, and none is needed. R minimises the residual, so
    by Danskin's theorem the gradient of the minimum equals the gradient at fixed R. This
    holds when X^T Y, before padding, has full rank min(d_s, d_t). The padded part of R
    is then not unique, but neither the loss nor its gradient depends on it. With
    d_s > d_t the padded residual also counts the d_s - d_t columns of x R that the
    target cannot match.

    Source: Schönemann, "A Generalized Solution of the Orthogonal Procrustes Problem"
    (Psychometrika 31(1), 1966). The zero padding for unequal widths is this plugin's
    addition. R may be a reflection, because the problem allows any orthogonal matrix.

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: procrustes, weight: 0.5, params: {center: true}}
    ```

    Args:
        params: A `ProcrustesAlignment.Params`.
        source_dim: Width of the source features.
        target_dim: Width of the target features.
    """

    class Params(PluginParams):
        """Options of `ProcrustesAlignment`."""

        center: bool = Field(
            default=False,
            description=(
                "Centre each side on its own mean before solving, and add the target mean back "
                "in transform."
            ),
        )

    params: Params
    fit_buffers = ("rotation", "source_mean", "target_mean")

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        self.width = max(source_dim, target_dim)

    def _check(self, source: torch.Tensor, target: torch.Tensor) -> None:
        _check_features(
            "procrustes",
            source,
            target,
            source_dim=self.source_dim,
            target_dim=self.target_dim,
            paired=True,
            min_rows=1,
        )

    def _centre(self, features: torch.Tensor) -> torch.Tensor:
        if not self.params.center:
            return features
        return features - features.mean(dim=0, keepdim=True)

    def _solve(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the orthogonal R (D, D) that best maps the zero-padded source rows onto the target rows."""
        padded_source = _pad_columns(source, self.width)
        padded_target = _pad_columns(target, self.width)
        left, _, right_transposed = torch.linalg.svd(padded_source.T @ padded_target)
        return left @ right_transposed

    @torch.no_grad()
    def fit(self, source: torch.Tensor, target: torch.Tensor) -> ProcrustesAlignment:
        """Solve for the orthogonal map on stored paired features and return self.

        Afterwards `rotation` R (D, D) and the two means contain the fit, in float64. The
        means are zero unless `center` is true.
        """
        self._check(source, target)
        source = source.detach().to(torch.float64)
        target = target.detach().to(torch.float64)
        self.rotation = self._solve(self._centre(source), self._centre(target))
        if self.params.center:
            self.source_mean = source.mean(dim=0)
            self.target_mean = target.mean(dim=0)
        else:
            self.source_mean = torch.zeros_like(source[0])
            self.target_mean = torch.zeros_like(target[0])
        return self

    def transform(self, source: torch.Tensor) -> torch.Tensor:
        """Map (batch, source_dim) features to (batch, target_dim) with the fitted R."""
        if self.rotation is None:
            raise _not_fitted_error("procrustes")
        _check_width("procrustes", source, self.source_dim, "source")
        padded = _pad_columns(source.to(torch.float64) - self._fitted("source_mean"), self.width)
        rotation = self._fitted("rotation")[:, : self.target_dim]
        mapped = padded @ rotation + self._fitted("target_mean")
        return mapped.to(source.dtype)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the mean squared residual of the batch under the R fitted to that batch."""
        self._check(source, target)
        source_rows = _pad_columns(self._centre(source.to(torch.float64)), self.width)
        target_rows = _pad_columns(self._centre(target.detach().to(torch.float64)), self.width)
        with torch.no_grad():
            rotation = self._solve(source_rows, target_rows)
        residual = source_rows @ rotation - target_rows
        return residual.pow(2).sum(dim=1).mean().to(source.dtype)


# CAAN


def _as_tokens(features: torch.Tensor, width: int, side: str) -> torch.Tensor:
    """Return (batch, tokens, width) features, reading a (batch, width) tensor as one token per row."""
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3 or features.shape[2] != width or features.shape[1] < 1:
        raise ValueError(
            f"The caan alignment expected {side} features of shape (batch, {width}) or "
            f"(batch, tokens, {width}), got {tuple(features.shape)}."
        )
    return features


class CAANAlignment(AlignmentPlugin):
    """Context-aware cross-attention alignment in the style of CAAN, with a hinge ranking loss.

    Inputs are (B, n_s, source_dim) source tokens and (B, n_t, target_dim) target tokens,
    such as image regions and words. A 2-D (B, width) input counts as one token per row. Both
    sides pass through a learned bias-free linear map to `dim` channels and are scaled to
    unit L2 norm. For source row a and target row b, with tokens s_i and t_j:

        H_ij = s_i^T t_j                      inter-modal affinity
        P = softmax over i of lambda H        column j: target token j's attention over source tokens
        Q = softmax over j of lambda H        row i: source token i's attention over target tokens
        G^s_ik = cos(P_i., P_k.)              second-order intra-modal correlation, source side
        G^t_jl = cos(Q_.j, Q_.l)              second-order intra-modal correlation, target side
        r^s_i = sum_k G^s_ik mean_j H_kj / sum_k G^s_ik,  alpha = softmax over i of lambda r^s
        r^t_j = sum_l G^t_jl mean_i H_il / sum_l G^t_jl,  beta = softmax over j of lambda r^t
        S_ab = cos(sum_i alpha_i s_i, sum_j beta_j t_j)

    A source token thus gains weight when the target tokens match it, and when tokens with
    a similar alignment profile are matched too. The loss is a bidirectional hinge ranking
    loss with margin m over the batch, row a of each side being the positive pair:

        loss = 1 / B * sum_a [ max_{b != a} (m - S_aa + S_ab)_+
                               + max_{b != a} (m - S_aa + S_ba)_+ ]

    With `hardest_negative: false` the max becomes a sum over b != a. After each forward,
    `source_attention` (B, B, n_s) and `target_attention` (B, B, n_t) contain alpha and beta,
    detached, indexed [source row, target row].

    Source: Zhang, Lei, Zhang & Li, "Context-Aware Attention Network for Image-Text
    Retrieval" (CVPR 2020), which derives intra-modal correlations from the second-order
    attention of region-word alignments. This plugin departs from that paper:

    - The formulas above are this plugin's own reading of the idea. The paper's exact
      affinity, normalisations and combination of inter- and intra-modal attention are
      not reproduced.
    - The paper learns region and word encoders. Here the inputs are given features, and
      the plugin learns only the two linear maps.
    - With pooled (B, dim) embeddings each side has one token, every attention weight is
      1, and S_ab reduces to the cosine of the two projected vectors.
    - It is a training loss, not a retrieval scorer. The hinge loss with the hardest
      negative follows VSE++ (Faghri et al., BMVC 2018), averaged over the batch.
    - There is no padding mask, so every token counts.

    Memory and time grow as B^2 * n_s * n_t, because every source row is attended against
    every target row.

    Config example:

    ```yaml
    distill:
      alignment:
        - {name: caan, weight: 0.5, params: {dim: 128, attention_scale: 10.0, margin: 0.2, hardest_negative: true}}
    ```

    Args:
        params: A `CAANAlignment.Params`.
        source_dim: Width of each source token.
        target_dim: Width of each target token.
    """

    class Params(PluginParams):
        """Options of `CAANAlignment`."""

        dim: int = Field(
            default=128, ge=1, le=8192, description="Width of the shared token space."
        )
        attention_scale: float = Field(
            default=10.0,
            gt=0.0,
            le=100.0,
            description="Inverse temperature lambda of the attention softmaxes.",
        )
        margin: float = Field(
            default=0.2, ge=0.0, le=2.0, description="Margin m of the hinge ranking loss."
        )
        hardest_negative: bool = Field(
            default=True,
            description="Count only the hardest negative of each row. False sums over all negatives.",
        )

    params: Params

    def __init__(self, params: Params, *, source_dim: int, target_dim: int) -> None:
        super().__init__(params, source_dim=source_dim, target_dim=target_dim)
        self.source_projection = nn.Linear(source_dim, params.dim, bias=False)
        self.target_projection = nn.Linear(target_dim, params.dim, bias=False)
        self.source_attention: torch.Tensor | None = None
        self.target_attention: torch.Tensor | None = None

    def similarity(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the (B, B) attended similarity S, source rows against target rows."""
        source_tokens = _as_tokens(source, self.source_dim, "source")
        target_tokens = _as_tokens(target.detach(), self.target_dim, "target")
        if source_tokens.shape[0] != target_tokens.shape[0]:
            raise ValueError(
                f"The caan alignment pairs source row i with target row i, but the source has "
                f"{source_tokens.shape[0]} rows and the target has {target_tokens.shape[0]}. "
                "Pass paired batches of equal size."
            )
        scale = self.params.attention_scale
        s = F.normalize(self.source_projection(source_tokens), dim=-1)  # (B, n_s, dim)
        t = F.normalize(self.target_projection(target_tokens), dim=-1)  # (B, n_t, dim)

        # Every pair (a, b) of a source row and a target row: (B, B, n_s, n_t).
        affinity = torch.einsum("aid,bjd->abij", s, t)
        over_source = torch.softmax(scale * affinity, dim=-2)
        over_target = torch.softmax(scale * affinity, dim=-1)

        # Second order: tokens of one side correlate when the other side attends to them
        # alike. Profiles are non-negative, so every correlation lies in [0, 1] and each
        # row sum is at least the diagonal 1.
        source_profiles = F.normalize(over_source, dim=-1)
        target_profiles = F.normalize(over_target, dim=-2)
        source_context = source_profiles @ source_profiles.transpose(-1, -2)  # (B, B, n_s, n_s)
        target_context = target_profiles.transpose(-1, -2) @ target_profiles  # (B, B, n_t, n_t)
        source_context = source_context / source_context.sum(dim=-1, keepdim=True)
        target_context = target_context / target_context.sum(dim=-1, keepdim=True)

        source_relevance = (source_context @ affinity.mean(dim=-1).unsqueeze(-1)).squeeze(-1)
        target_relevance = (target_context @ affinity.mean(dim=-2).unsqueeze(-1)).squeeze(-1)
        source_weights = torch.softmax(scale * source_relevance, dim=-1)  # (B, B, n_s)
        target_weights = torch.softmax(scale * target_relevance, dim=-1)  # (B, B, n_t)
        self.source_attention = source_weights.detach()
        self.target_attention = target_weights.detach()

        source_pooled = torch.einsum("abi,aid->abd", source_weights, s)
        target_pooled = torch.einsum("abj,bjd->abd", target_weights, t)
        return F.cosine_similarity(source_pooled, target_pooled, dim=-1)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the bidirectional hinge ranking loss of the attended similarities."""
        similarity = self.similarity(source, target)
        batch = similarity.shape[0]
        if batch < 2:
            raise ValueError(
                f"The caan alignment ranks each row against the other rows of the batch, so it "
                f"needs at least 2 rows, got {batch}. Use a larger batch."
            )
        positive = similarity.diagonal()
        is_positive = torch.eye(batch, dtype=torch.bool, device=similarity.device)
        margin = self.params.margin
        # Row a: source a against the other target rows. Column b: target b against the
        # other source rows.
        source_cost = (margin - positive.unsqueeze(1) + similarity).clamp(min=0.0)
        target_cost = (margin - positive.unsqueeze(0) + similarity).clamp(min=0.0)
        source_cost = source_cost.masked_fill(is_positive, 0.0)
        target_cost = target_cost.masked_fill(is_positive, 0.0)
        if self.params.hardest_negative:
            return (source_cost.amax(dim=1) + target_cost.amax(dim=0)).mean()
        return (source_cost.sum(dim=1) + target_cost.sum(dim=0)).mean()
