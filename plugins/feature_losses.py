"""Built-in feature distillation losses: MSE, FitNets, cosine and attention transfer.

Each compares the student's fused embedding with the teacher's, one example at a time,
mostly through a learned projection that the loss owns and trains with the student.
Every term takes one fused embedding per example, so a method defined on feature maps
or inner layers is applied to that embedding. Teacher features are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmkd.plugin_api import DistillationInputs, LossPlugin, PluginParams
from mmkd.plugins._loss_shared import checked_features, linear_projection

__all__ = [
    "AttentionTransferLoss",
    "CosineLoss",
    "FeatureMSELoss",
    "FitNetsLoss",
]


class FeatureMSELoss(LossPlugin):
    """FitNets-style hint loss: mean squared error from projected student to teacher features.

    Formula, with W, b a learned linear projection from student_dim to teacher_dim:

        loss = 1 / (B * D) * sum_b sum_d (W s_b + b - t_b)_d^2,  D = teacher_dim

    With `normalize`, W s_b + b and t_b are each scaled to unit L2 norm first. The
    projection is owned by this loss and trained with the student. With
    `projection: false` the student features are compared as they are, which needs
    student_dim == teacher_dim. Source: Romero et al., "FitNets: Hints for Thin Deep
    Nets" (ICLR 2015), which regresses teacher hidden layers from the student's through
    a learned regressor.

    Config example:

    ```yaml
    distill:
      losses:
        - {name: mse, weight: 0.5, params: {projection: true, normalize: false}}
    ```

    Args:
        params: A `FeatureMSELoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.

    Raises:
        ValueError: `projection` is false and the two widths differ.
    """

    class Params(PluginParams):
        """Options of `FeatureMSELoss`."""

        projection: bool = Field(
            default=True,
            description="Learn a linear map from student_dim to teacher_dim, even if equal.",
        )
        normalize: bool = Field(
            default=False, description="Scale both feature vectors to unit L2 norm before the MSE."
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.projection: nn.Module
        if params.projection:
            self.projection = nn.Linear(student_dim, teacher_dim)
        elif student_dim != teacher_dim:
            raise ValueError(
                f"The mse loss with projection: false needs equal feature widths, but "
                f"student_dim is {student_dim} and teacher_dim is {teacher_dim}. Set "
                "projection: true to learn a map between them."
            )
        else:
            self.projection = nn.Identity()

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student = inputs.student_features
        teacher = inputs.teacher_features.detach()
        if student.shape[-1] != self.student_dim or teacher.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"The mse loss was built for student_dim {self.student_dim} and teacher_dim "
                f"{self.teacher_dim}, but got student features of shape {tuple(student.shape)} "
                f"and teacher features of shape {tuple(teacher.shape)}."
            )

        predicted = self.projection(student)
        if self.params.normalize:
            predicted = F.normalize(predicted, dim=-1)
            teacher = F.normalize(teacher, dim=-1)
        return F.mse_loss(predicted, teacher)


class FitNetsLoss(LossPlugin):
    """FitNets hint loss: a learned regressor maps the student features onto the teacher's.

    Formula, with r the regressor from student_dim to teacher_dim:

        r(s) = W2 relu(W1 s + b1) + b2   if hidden > 0,   r(s) = W s + b   if hidden = 0
        loss = 1 / (B * D) * sum_b sum_d (r(s_b) - t_b)_d^2,  D = teacher_dim

    Source: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015). The paper
    regresses a middle teacher layer (the hint) from a middle student layer through a
    convolutional regressor, with the loss 1/2 * ||t - r(s)||^2 per example, as a first
    training stage. Here both sides are the fused embeddings, the term trains jointly with
    the others, and the squared error is averaged over batch and dimensions, so the
    paper's per-example loss is D / 2 times this value.

    Unlike `mse`, the default regressor has a hidden ReLU layer, so it can fit teacher
    features that are no linear function of the student's. With hidden: 0 this term
    equals `mse` with projection: true and normalize: false.

    Config example:

    ```yaml
    distill:
      losses:
        - {name: fitnets, weight: 1.0, params: {hidden: 256}}
    ```

    Args:
        params: A `FitNetsLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.
    """

    class Params(PluginParams):
        """Options of `FitNetsLoss`."""

        hidden: int = Field(
            default=256,
            ge=0,
            le=65536,
            description="Width of the regressor's hidden ReLU layer, or 0 for one linear layer.",
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.regressor: nn.Module
        if params.hidden == 0:
            self.regressor = nn.Linear(student_dim, teacher_dim)
        else:
            self.regressor = nn.Sequential(
                nn.Linear(student_dim, params.hidden),
                nn.ReLU(),
                nn.Linear(params.hidden, teacher_dim),
            )

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = checked_features("fitnets", inputs, self.student_dim, self.teacher_dim)
        return F.mse_loss(self.regressor(student), teacher)


class CosineLoss(LossPlugin):
    """Cosine embedding loss: one minus the cosine similarity of student and teacher features.

    Formula, with W, b a learned linear projection from student_dim to teacher_dim:

        loss = 1 / B * sum_b (1 - <W s_b + b, t_b> / (||W s_b + b|| * ||t_b||))

    It matches directions only, so the student need not reproduce the teacher's feature
    norms. A zero vector on either side counts as cosine 0 (loss 1) because the norm
    product is floored at 1e-8. Source: Sanh, Debut, Chaumond & Wolf, "DistilBERT, a
    distilled version of BERT: smaller, faster, cheaper and lighter" (NeurIPS 2019
    workshop on Energy Efficient Machine Learning and Cognitive Computing,
    arXiv:1910.01108), which adds this term on hidden states to align their directions.

    Config example:

    ```yaml
    distill:
      losses:
        - {name: cosine, weight: 1.0, params: {projection: true}}
    ```

    Args:
        params: A `CosineLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.

    Raises:
        ValueError: `projection` is false and the two widths differ.
    """

    class Params(PluginParams):
        """Options of `CosineLoss`."""

        projection: bool = Field(
            default=True,
            description="Learn a linear map from student_dim to teacher_dim, even if equal.",
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.projection = linear_projection("cosine", params.projection, student_dim, teacher_dim)

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = checked_features("cosine", inputs, self.student_dim, self.teacher_dim)
        similarity = F.cosine_similarity(self.projection(student), teacher, dim=1, eps=1e-8)
        return (1.0 - similarity).mean()


class AttentionTransferLoss(LossPlugin):
    """Attention transfer: match the normalised pattern of activation magnitudes.

    Formula, with W, b a learned linear projection from student_dim to teacher_dim and
    the attention vector a(x) = |x|^p / || |x|^p ||_2, powers taken elementwise:

        loss = 1 / B * sum_b || a(W s_b + b) - a(t_b) ||_2

    Source: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer" (ICLR 2017). The
    paper sums |A_c|^p over the channels c of a feature map to get a spatial attention map
    and compares the L2-normalised maps with the L2 norm of their difference, not its
    square, with p = 2. Here the features are one embedding per example, so each
    embedding dimension plays the part of a spatial position with a single channel.
    The paper's weight beta / 2 is left to the term's weight in the config. Widths
    usually differ, so the student is projected to teacher_dim first.

    Config example:

    ```yaml
    distill:
      losses:
        - {name: attention_transfer, weight: 1.0, params: {exponent: 2.0, projection: true}}
    ```

    Args:
        params: An `AttentionTransferLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.

    Raises:
        ValueError: `projection` is false and the two widths differ.
    """

    class Params(PluginParams):
        """Options of `AttentionTransferLoss`."""

        exponent: float = Field(
            default=2.0,
            ge=1.0,
            le=8.0,
            description="Power p of the magnitudes. Below 1 the gradient at 0 is infinite.",
        )
        projection: bool = Field(
            default=True,
            description="Learn a linear map from student_dim to teacher_dim, even if equal.",
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.projection = linear_projection(
            "attention_transfer", params.projection, student_dim, teacher_dim
        )

    def _attention(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.abs().pow(self.params.exponent), dim=1)

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = checked_features(
            "attention_transfer", inputs, self.student_dim, self.teacher_dim
        )
        difference = self._attention(self.projection(student)) - self._attention(teacher)
        return torch.linalg.vector_norm(difference, dim=1).mean()
