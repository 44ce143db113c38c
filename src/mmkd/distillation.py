"""The distillation objective: a weighted sum of named loss plugins."""

from __future__ import annotations

import torch
from torch import nn

from mmkd.config import AlignmentTerm, LossTerm
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.plugin_api import DistillationInputs
from mmkd.registry import get_registry
from mmkd.training import Batch


class DistillationObjective(nn.Module):
    """Sum of `weight * term(inputs)` over the configured loss terms and alignment terms.

    Teacher outputs are looked up by row position in `teacher_logits` and
    `teacher_embeddings`, which hold the stored outputs of the training rows. An
    alignment term gets the student embedding as source and the teacher's as target, or,
    with `modalities`, the student's embeddings of those two modalities on the rows that
    have both (read from `student.modality_features` after its forward pass).
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
        student: MultimodalClassifier | None = None,
    ) -> None:
        super().__init__()
        losses, aligners = get_registry("losses"), get_registry("alignment")
        alignment = alignment or []
        if any(t.modalities for t in alignment) and student is None:
            raise ValueError("alignment terms between modalities need the student model; pass student=")
        # A tuple, so the student is not registered as a submodule of the objective.
        self._student = (student,)
        self.modality_pairs = [
            None if t.modalities is None else tuple(student.modalities.index(m) for m in t.modalities)  # type: ignore[union-attr]
            for t in alignment
        ]
        every = [t.name for t in terms] + [
            t.name if t.modalities is None else f"{t.name}:{t.modalities[0]}-{t.modalities[1]}" for t in alignment
        ]
        self.names = [name if every.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(every)]
        self.weights = [t.weight for t in [*terms, *alignment]]
        self.is_alignment = [False] * len(terms) + [True] * len(alignment)
        built = []
        for t in terms:
            plugin = losses.get(t.name)
            built.append(plugin(plugin.Params(**t.params), student_dim=student_dim, teacher_dim=teacher_dim))
        for t in alignment:
            plugin = aligners.get(t.name)
            if t.modalities is None:
                built.append(plugin(plugin.Params(**t.params), source_dim=student_dim, target_dim=teacher_dim))
            else:
                width = student.embed_dim  # type: ignore[union-attr]
                built.append(plugin(plugin.Params(**t.params), source_dim=width, target_dim=width))
        self.terms = nn.ModuleList(built)
        self.pairs = [None] * len(terms) + self.modality_pairs
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
        for name, weight, term, aligns, pair in zip(
            self.names, self.weights, self.terms, self.is_alignment, self.pairs, strict=True
        ):
            if pair is not None:
                value = self._between_modalities(term, pair, batch[0][-1])
            elif aligns:
                value = term(inputs.student_features, inputs.teacher_features)
            else:
                value = term(inputs)
            values[name] = float(value.detach())
            total = total + weight * value
        return total, values

    def _between_modalities(self, term: nn.Module, pair: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
        """Align the student's embedding of one modality with another's, on rows that have both."""
        features = self._student[0].modality_features  # type: ignore[union-attr]
        source, target = pair
        both = (mask[:, source] & mask[:, target]).to(features[source].device)
        if int(both.sum()) < 2:
            # Alignment needs at least two rows; zero keeps the graph connected.
            return features[source].sum() * 0.0
        return term(features[source][both], features[target][both])
