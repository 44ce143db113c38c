"""The distillation objective: a weighted sum of named loss plugins."""

from __future__ import annotations

import torch
from torch import nn

from mmkd.config import AlignmentTerm, LossTerm
from mmkd.plugin_api import DistillationInputs
from mmkd.registry import get_registry
from mmkd.training import Batch


class DistillationObjective(nn.Module):
    """Sum of `weight * term(inputs)` over the configured loss terms and alignment terms.

    Teacher outputs are looked up by row position in `teacher_logits` and
    `teacher_embeddings`, which hold the stored outputs of the training rows. An
    alignment term gets the student embedding as source and the teacher's as target.
    """

    def __init__(
        self,
        terms: list[LossTerm],
        *,
        student_dim: int,
        teacher_dim: int,
        teacher_logits: torch.Tensor,
        teacher_embeddings: torch.Tensor,
        alignment: list[AlignmentTerm] | None = None,
    ) -> None:
        super().__init__()
        losses, aligners = get_registry("losses"), get_registry("alignment")
        alignment = alignment or []
        every = [t.name for t in [*terms, *alignment]]
        self.names = [name if every.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(every)]
        self.weights = [t.weight for t in [*terms, *alignment]]
        self.is_alignment = [False] * len(terms) + [True] * len(alignment)
        built = []
        for t in terms:
            plugin = losses.get(t.name)
            built.append(plugin(plugin.Params(**t.params), student_dim=student_dim, teacher_dim=teacher_dim))
        for t in alignment:
            plugin = aligners.get(t.name)
            built.append(plugin(plugin.Params(**t.params), source_dim=student_dim, target_dim=teacher_dim))
        self.terms = nn.ModuleList(built)
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
        for name, weight, term, aligns in zip(self.names, self.weights, self.terms, self.is_alignment, strict=True):
            value = term(inputs.student_features, inputs.teacher_features) if aligns else term(inputs)
            values[name] = float(value.detach())
            total = total + weight * value
        return total, values
