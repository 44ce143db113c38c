"""The distillation objective: a weighted sum of named loss plugins."""

from __future__ import annotations

import torch
from torch import nn

from mmkd.config import LossTerm
from mmkd.plugin_api import DistillationInputs
from mmkd.registry import get_registry
from mmkd.training import Batch


class DistillationObjective(nn.Module):
    """Sum of `weight * term(inputs)` over the configured loss terms.

    Teacher outputs are looked up by row position in `teacher_logits` and
    `teacher_embeddings`, which hold the stored outputs of the training rows.
    """

    def __init__(
        self,
        terms: list[LossTerm],
        *,
        student_dim: int,
        teacher_dim: int,
        teacher_logits: torch.Tensor,
        teacher_embeddings: torch.Tensor,
    ) -> None:
        super().__init__()
        registry = get_registry("losses")
        self.names = [f"{t.name}" if [u.name for u in terms].count(t.name) == 1 else f"{t.name}_{i}" for i, t in enumerate(terms)]
        self.weights = [t.weight for t in terms]
        self.terms = nn.ModuleList(
            registry.get(t.name)(registry.get(t.name).Params(**t.params), student_dim=student_dim, teacher_dim=teacher_dim)
            for t in terms
        )
        self.register_buffer("teacher_logits", teacher_logits)
        self.register_buffer("teacher_embeddings", teacher_embeddings)

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits, embedding = outputs
        rows = batch[2].to(self.teacher_logits.device)
        inputs = DistillationInputs(
            student_logits=logits,
            teacher_logits=self.teacher_logits[rows],
            student_features=embedding,
            teacher_features=self.teacher_embeddings[rows],
            labels=batch[1],
        )
        total = logits.new_zeros(())
        values = {}
        for name, weight, term in zip(self.names, self.weights, self.terms, strict=True):
            value = term(inputs)
            values[name] = float(value.detach())
            total = total + weight * value
        return total, values
