"""Checks and helpers shared by the built-in loss plugins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.plugin_api import DistillationInputs


def soft_target_kl(
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


def checked_features(
    loss_name: str, inputs: DistillationInputs, student_dim: int, teacher_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the feature shapes, then return the student and the detached teacher features."""
    student = inputs.student_features
    teacher = inputs.teacher_features.detach()
    if (
        student.dim() != 2
        or teacher.dim() != 2
        or student.shape[1] != student_dim
        or teacher.shape[1] != teacher_dim
    ):
        raise ValueError(
            f"The {loss_name} loss was built for student_dim {student_dim} and teacher_dim "
            f"{teacher_dim}, but got student features of shape {tuple(student.shape)} and "
            f"teacher features of shape {tuple(teacher.shape)}. Pass (batch, width) tensors "
            "of those widths, or build the loss with the widths the two models output."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"The {loss_name} loss got {student.shape[0]} rows of student features but "
            f"{teacher.shape[0]} rows of teacher features. Row i of both must be the same example."
        )
    # A feature store may hold half-precision teacher features.
    return student, teacher.to(student.dtype)


def linear_projection(
    loss_name: str, enabled: bool, student_dim: int, teacher_dim: int
) -> nn.Module:
    """Build a learned linear map from student_dim to teacher_dim, or the identity when disabled."""
    if enabled:
        return nn.Linear(student_dim, teacher_dim)
    if student_dim != teacher_dim:
        raise ValueError(
            f"The {loss_name} loss with projection: false needs equal feature widths, but "
            f"student_dim is {student_dim} and teacher_dim is {teacher_dim}. Set "
            "projection: true to learn a map between them."
        )
    return nn.Identity()


def zero_loss(reference: torch.Tensor) -> torch.Tensor:
    """Return a zero scalar inside the autograd graph of `reference`.

    Relation terms return it for a batch with too few rows to form a pair or a triplet,
    such as the last, partial batch of an epoch, so that `backward()` still works.
    """
    return (reference * 0.0).sum()


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """Return the off-diagonal entries of a square (n, n) matrix as (n, n - 1), row by row."""
    n = matrix.shape[0]
    # Without its first entry, the flattened matrix splits into n - 1 runs of n + 1 values
    # that each end with a diagonal entry. Dropping that last column leaves the rest in
    # row order, without the host sync that boolean-mask indexing costs on a GPU.
    return matrix.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def row_kl(target_log_probs: torch.Tensor, input_log_probs: torch.Tensor) -> torch.Tensor:
    """Return KL(target || input) of each row, from log-probabilities, summed over the last axis."""
    divergence = F.kl_div(input_log_probs, target_log_probs, reduction="none", log_target=True)
    return divergence.sum(dim=-1)
