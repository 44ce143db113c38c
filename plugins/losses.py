"""Built-in logit distillation losses: soft-target KL, Hinton's combined loss and decoupled KD.

A config combines terms as a weighted sum, each term named by its entry point:

```yaml
distill:
  losses:
    - {name: hinton, weight: 1.0, params: {temperature: 4.0, alpha: 0.9}}
    - {name: mse, weight: 0.5}
```

Feature terms are in `mmkd.plugins.feature_losses` and relation terms, which compare
the examples of one batch with each other, in `mmkd.plugins.relation_losses`. Teacher
tensors are targets, so every term detaches them: no gradient reaches the teacher or
the feature store it was read from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mmkd.plugin_api import DistillationInputs, LossPlugin, PluginParams
from mmkd.plugins._loss_shared import row_kl, soft_target_kl

__all__ = [
    "DKDLoss",
    "HintonLoss",
    "KLDivergenceLoss",
]


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
    distill:
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
        divergence = soft_target_kl(inputs.student_logits, inputs.teacher_logits, temperature)
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
    distill:
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
        soft = soft_target_kl(inputs.student_logits, inputs.teacher_logits, temperature)
        hard = F.cross_entropy(inputs.student_logits, inputs.labels)
        return alpha * temperature**2 * soft + (1.0 - alpha) * hard


class DKDLoss(LossPlugin):
    """Decoupled knowledge distillation: target-class and non-target-class terms, weighted apart.

    Formula, for a row with label y, p = softmax(teacher_logits / T) and
    q = softmax(student_logits / T):

        TCKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y])
        NCKD = KL(p_hat || q_hat),  p_hat_c = p_c / (1 - p_y) over the classes c != y,
                                    q_hat likewise
        loss = w * T^2 / B * sum_b (alpha * TCKD_b + beta * NCKD_b)

    Classical KD decomposes as KL(p || q) = TCKD + (1 - p_y) * NCKD, so a confident
    teacher (p_y near 1) suppresses the non-target term. DKD weights NCKD by beta instead.

    In training mode, the n-th forward call, this one included, scales the loss by the
    warm-up factor w = min(n / warmup_steps, 1). w is 1 in eval mode and when
    warmup_steps is 0. The count n is a buffer, so it is saved with the state dict. The
    term uses the logits and labels only.

    Source: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation" (CVPR
    2022). The defaults alpha = 1, beta = 8 and T = 4 are the paper's CIFAR-100 settings.
    The paper also warms the loss up linearly over its first 20 epochs, but this term
    defaults to no warm-up because the number of steps per epoch depends on the data. Set
    warmup_steps to about 20 epochs of steps to follow the paper. Scaling both terms by
    T^2, as for classical KD, is also a choice made here.

    Config example:

    ```yaml
    distill:
      losses:
        - name: dkd
          weight: 1.0
          params: {alpha: 1.0, beta: 8.0, temperature: 4.0, warmup_steps: 600}
    ```

    Args:
        params: A `DKDLoss.Params`.
        student_dim: Width of the student features, unused by this term.
        teacher_dim: Width of the teacher features, unused by this term.
    """

    class Params(PluginParams):
        """Options of `DKDLoss`."""

        alpha: float = Field(default=1.0, ge=0.0, le=100.0, description="Weight of TCKD.")
        beta: float = Field(default=8.0, ge=0.0, le=100.0, description="Weight of NCKD.")
        temperature: float = Field(
            default=4.0, gt=0.0, le=100.0, description="Softmax temperature T for both models."
        )
        warmup_steps: int = Field(
            default=0,
            ge=0,
            le=10_000_000,
            description="Training-mode forward calls over which the loss ramps up, or 0 for none.",
        )

    params: Params
    steps_done: torch.Tensor

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def decoupled_terms(self, inputs: DistillationInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute TCKD and NCKD of each row, at temperature T, without the T^2 scale.

        Returns:
            Two (batch,) tensors: TCKD and NCKD.

        Raises:
            ValueError: The logits or labels have the wrong shape, fewer than 2 classes, or
                a label outside 0 .. classes - 1.
        """
        student_logits, teacher_logits = inputs.student_logits, inputs.teacher_logits.detach()
        labels = inputs.labels
        if (
            student_logits.shape != teacher_logits.shape
            or student_logits.dim() != 2
            or student_logits.shape[1] < 2
        ):
            raise ValueError(
                f"The dkd loss needs student and teacher logits of the same (batch, classes) "
                f"shape with at least 2 classes, but got {tuple(student_logits.shape)} and "
                f"{tuple(teacher_logits.shape)}."
            )
        batch, classes = student_logits.shape
        if labels.shape != (batch,):
            raise ValueError(
                f"The dkd loss needs one label per row, shape ({batch},), but got labels of "
                f"shape {tuple(labels.shape)}."
            )
        if batch > 0 and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(
                f"The dkd loss got labels from {int(labels.min())} to {int(labels.max())}, but "
                f"with {classes} classes each label must be in 0 .. {classes - 1}."
            )

        temperature = self.params.temperature
        student_scaled = student_logits / temperature
        teacher_scaled = teacher_logits.to(student_logits.dtype) / temperature
        # Row b's non-target classes are 0 .. classes - 1 without labels[b], in order.
        other = torch.arange(classes - 1, device=labels.device).unsqueeze(0)
        other = other + (other >= labels.unsqueeze(1)).long()

        def binary_and_rest(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Log-probabilities of [target, any other class] and over the other classes only,
            # both from logsumexp, so that 1 - p_y keeps its precision when p_y is near 1.
            rest = scaled.gather(1, other)
            log_total = torch.logsumexp(scaled, dim=1, keepdim=True)
            log_target = scaled.gather(1, labels.unsqueeze(1)) - log_total
            log_rest = torch.logsumexp(rest, dim=1, keepdim=True) - log_total
            return torch.cat([log_target, log_rest], dim=1), F.log_softmax(rest, dim=1)

        student_binary, student_rest = binary_and_rest(student_scaled)
        teacher_binary, teacher_rest = binary_and_rest(teacher_scaled)
        return row_kl(teacher_binary, student_binary), row_kl(teacher_rest, student_rest)

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the logits and labels, counting steps in training mode."""
        tckd, nckd = self.decoupled_terms(inputs)
        temperature = self.params.temperature
        loss = temperature**2 * (self.params.alpha * tckd.mean() + self.params.beta * nckd.mean())
        if self.training and self.params.warmup_steps > 0:
            with torch.no_grad():
                self.steps_done += 1
            # Computed on the loss's device, so the factor adds no host sync.
            factor = torch.clamp(self.steps_done.to(loss.dtype) / self.params.warmup_steps, max=1.0)
            loss = loss * factor
        return loss
