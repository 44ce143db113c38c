"""Built-in distillation loss plugins: soft-target KL, Hinton's combined loss, feature MSE.

A config combines terms as a weighted sum, each term named by its entry point:

```yaml
losses:
  - {name: hinton, weight: 1.0, params: {temperature: 4.0, alpha: 0.9}}
  - {name: mse, weight: 0.5}
```

Teacher tensors are targets, so every term detaches them: no gradient reaches the
teacher or the feature store it was read from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmkd.plugin_api import DistillationInputs, LossPlugin, PluginParams

__all__ = ["FeatureMSELoss", "HintonLoss", "KLDivergenceLoss"]


def _soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return KL(softmax(teacher / T) || softmax(student / T)), summed over classes, batch mean."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits have shape {tuple(student_logits.shape)} but teacher logits have "
            f"shape {tuple(teacher_logits.shape)}; both must be (batch, classes) with the same "
            "class order."
        )
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    # F.kl_div takes the student as input and the teacher as target and sums
    # p_target * (log p_target - log p_input), so the teacher is the reference
    # distribution. "batchmean" divides that sum by the batch size.
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)


class KLDivergenceLoss(LossPlugin):
    """Soft-target KL divergence between the teacher's and the student's class distributions.

    Formula, with p = softmax(teacher_logits / T) and q = softmax(student_logits / T):

        loss = s / B * sum_b sum_c p_bc * (log p_bc - log q_bc),  s = T^2 or 1

    The teacher distribution is the target, so this is KL(p || q), not KL(q || p). The
    T^2 factor, on by default, keeps gradient magnitudes comparable across temperatures,
    as argued by Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"
    (arXiv:1503.02531, 2015).

    Config example:

    ```yaml
    losses:
      - {name: kl, weight: 1.0, params: {temperature: 4.0, scale_by_t_squared: true}}
    ```

    Args:
        params: A `KLDivergenceLoss.Params`.
        student_dim: Width of the student features; unused by this term.
        teacher_dim: Width of the teacher features; unused by this term.
    """

    class Params(PluginParams):
        """Options of `KLDivergenceLoss`."""

        temperature: float = Field(
            default=4.0, gt=0.0, le=100.0, description="Softmax temperature T for both models."
        )
        scale_by_t_squared: bool = Field(
            default=True, description="Multiply the divergence by T^2."
        )

    params: Params

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher logits."""
        temperature = self.params.temperature
        divergence = _soft_target_kl(inputs.student_logits, inputs.teacher_logits, temperature)
        if self.params.scale_by_t_squared:
            divergence = divergence * temperature**2
        return divergence


class HintonLoss(LossPlugin):
    """Knowledge distillation loss of Hinton, Vinyals & Dean: soft targets plus true labels.

    Formula, with p = softmax(teacher_logits / T) and q = softmax(student_logits / T):

        loss = alpha * T^2 * KL(p || q) + (1 - alpha) * CE(student_logits, labels)

    KL is summed over classes and averaged over the batch. The cross-entropy uses the
    student logits at temperature 1, averaged over the batch. Source: "Distilling the
    Knowledge in a Neural Network" (arXiv:1503.02531, 2015), which also gives the T^2
    factor.

    Config example:

    ```yaml
    losses:
      - {name: hinton, weight: 1.0, params: {temperature: 4.0, alpha: 0.9}}
    ```

    Args:
        params: A `HintonLoss.Params`.
        student_dim: Width of the student features; unused by this term.
        teacher_dim: Width of the teacher features; unused by this term.
    """

    class Params(PluginParams):
        """Options of `HintonLoss`."""

        temperature: float = Field(
            default=4.0, gt=0.0, le=100.0, description="Softmax temperature T of the soft targets."
        )
        alpha: float = Field(
            default=0.9,
            ge=0.0,
            le=1.0,
            description="Weight of the soft-target term. The label cross-entropy gets 1 - alpha.",
        )

    params: Params

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the logits and the integer labels."""
        temperature = self.params.temperature
        alpha = self.params.alpha
        soft = _soft_target_kl(inputs.student_logits, inputs.teacher_logits, temperature)
        hard = F.cross_entropy(inputs.student_logits, inputs.labels)
        return alpha * temperature**2 * soft + (1.0 - alpha) * hard


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
