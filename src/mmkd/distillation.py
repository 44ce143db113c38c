"""The distillation objective: a weighted sum of named loss plugins."""

from __future__ import annotations

from dataclasses import replace

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

    A term whose `teacher_features` is not "fused" compares the student embedding with the
    tensor of that name in `teacher_targets` (rows, width): the teacher's embedding of one
    modality, or a stored teacher layer ("layer:<module>").
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
        teacher_targets: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        losses, aligners = get_registry("losses"), get_registry("alignment")
        alignment = alignment or []
        teacher_targets = teacher_targets or {}
        self.targets: list[str | None] = []
        for t in [*terms, *alignment]:
            if t.teacher_features == "fused":
                self.targets.append(None)
            elif t.teacher_features not in teacher_targets:
                raise ValueError(
                    f"loss term {t.name!r} compares with the teacher's {t.teacher_features} features, but the stored "
                    f"teacher outputs have only {', '.join(['fused', *teacher_targets])}"
                )
            else:
                self.targets.append(t.teacher_features)
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
        widths = [teacher_dim if target is None else teacher_targets[target].shape[1] for target in self.targets]
        for t, width in zip(terms, widths[: len(terms)], strict=True):
            plugin = losses.get(t.name)
            built.append(plugin(plugin.Params(**t.params), student_dim=student_dim, teacher_dim=width))
        for t, width in zip(alignment, widths[len(terms):], strict=True):
            plugin = aligners.get(t.name)
            if t.modalities is None:
                built.append(plugin(plugin.Params(**t.params), source_dim=student_dim, target_dim=width))
            else:
                width = student.embed_dim  # type: ignore[union-attr]
                built.append(plugin(plugin.Params(**t.params), source_dim=width, target_dim=width))
        self.terms = nn.ModuleList(built)
        self.pairs = [None] * len(terms) + self.modality_pairs
        self.register_buffer("teacher_logits", teacher_logits)
        self.register_buffer("teacher_embeddings", teacher_embeddings)
        # Buffers, so the targets follow the objective to the training device.
        self._target_buffers = {name: f"teacher_target_{i}" for i, name in enumerate(sorted(set(self.targets) - {None}))}
        for name, buffer in self._target_buffers.items():
            self.register_buffer(buffer, teacher_targets[name])

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
        per_target = {None: inputs}
        for target, buffer in self._target_buffers.items():
            per_target[target] = replace(inputs, teacher_features=getattr(self, buffer)[rows])
        total = logits.new_zeros(())
        values = {}
        for name, weight, term, aligns, pair, target in zip(
            self.names, self.weights, self.terms, self.is_alignment, self.pairs, self.targets, strict=True
        ):
            inputs = per_target[target]
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
