"""The contract between mmkd and its fusion, alignment and loss plugins.

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


class AlignmentPlugin(nn.Module):
    """Aligns source features with target features: student with teacher, or one modality with another.

    Subclasses take `(params, *, source_dim, target_dim)` in `__init__` and implement
    `forward(source, target)`, which maps a (batch, source_dim) and a (batch, target_dim)
    tensor to a scalar alignment loss, differentiable with respect to `source` and the
    plugin's own parameters. The target is a reference: implementations detach it.

    Methods with a closed-form solution (such as TCA, CORAL recolouring, linear CCA and
    orthogonal Procrustes) also implement `fit(source, target)` on stored features, which
    estimates their map without gradients, and `transform(source)`, which applies the
    fitted map to new samples. The base class raises `NotImplementedError` for both.
    """

    plugin_api = PLUGIN_API_VERSION
    Params: type[PluginParams] = PluginParams

    def __init__(self, params: PluginParams, *, source_dim: int, target_dim: int) -> None:
        super().__init__()
        self.params = params
        self.source_dim = source_dim
        self.target_dim = target_dim

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def fit(self, source: torch.Tensor, target: torch.Tensor) -> AlignmentPlugin:
        """Estimate the closed-form map from stored features and return self."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form fit; train it through forward().")

    def transform(self, source: torch.Tensor) -> torch.Tensor:
        """Map new source samples with the fitted map."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form transform.")
