"""The contract between mmkd and its fusion and loss plugins.

A plugin is an `nn.Module` subclass with a nested pydantic model `Params` that holds
its options, and a class attribute `plugin_api` naming the version of this contract it
was written for. Plugins are found through the entry-point groups in `GROUPS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

PLUGIN_API_VERSION = 1

GROUPS = {
    "fusion": "mmkd.fusion",
    "alignment": "mmkd.alignment",
    "losses": "mmkd.losses",
}


class PluginParams(BaseModel):
    """Base of every plugin's parameter model: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class DistillationInputs:
    """One batch of student and teacher outputs, as every loss plugin receives it.

    Attributes:
        student_logits: (batch, classes) raw student scores.
        teacher_logits: (batch, classes) raw teacher scores, read from the feature store.
        student_features: (batch, student_dim) fused student embedding.
        teacher_features: (batch, teacher_dim) fused teacher embedding.
        labels: (batch,) integer class indices.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_features: torch.Tensor
    teacher_features: torch.Tensor
    labels: torch.Tensor


class FusionPlugin(nn.Module):
    """Combines one embedding per modality into one embedding.

    Subclasses take `(input_dims, params)` in `__init__`, set `output_dim`, and implement
    `forward(features, mask)` where `features[m]` is (batch, input_dims[m]) and `mask` is
    a (batch, modalities) bool tensor, True where the row has that modality. A missing
    modality's features must not influence the output.
    """

    plugin_api = PLUGIN_API_VERSION
    Params: type[PluginParams] = PluginParams
    output_dim: int

    def __init__(self, input_dims: Sequence[int], params: PluginParams) -> None:
        super().__init__()
        self.input_dims = list(input_dims)
        self.params = params


class LossPlugin(nn.Module):
    """A distillation loss term: maps `DistillationInputs` to a scalar tensor.

    Subclasses take `(params, *, student_dim, teacher_dim)` in `__init__`; a term that
    compares features of different widths owns the learned projection between them, and
    its parameters are trained with the student.
    """

    plugin_api = PLUGIN_API_VERSION
    Params: type[PluginParams] = PluginParams

    def __init__(self, params: PluginParams, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.params = params
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
