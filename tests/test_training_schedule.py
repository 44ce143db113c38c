"""Training runs of one to a few optimiser steps: the schedule must not fail on them."""

from __future__ import annotations

import pytest
import torch

from mmkd.config import AudioConfig, ImageConfig, ModelConfig, TrainConfig
from mmkd.data.loading import TensorDataset
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.training import Runtime, cross_entropy_loss, fit


def image_rows(count: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(count)
    return TensorDataset(
        inputs={"image": torch.randn(count, 1, 28, 28, generator=generator)},
        mask=torch.ones(count, 1, dtype=torch.bool), labels=torch.arange(count) % 2,
        ids=[str(i) for i in range(count)], splits=["train"] * count, keys=[str(i) for i in range(count)],
        classes=["0", "1"], modalities=["image"],
    )


@pytest.mark.parametrize(("rows", "epochs"), [(4, 1), (8, 1), (4, 2), (20, 1), (12, 3)])
def test_short_run_trains(rows, epochs):
    torch.manual_seed(0)
    model = MultimodalClassifier(ModelConfig(image_encoder={"width": 2, "blocks": [1]}, embed_dim=4),
                                 modalities=["image"], num_classes=2, image=ImageConfig(), audio=AudioConfig())
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(epochs=epochs, batch_size=4, lr=0.01, patience=epochs)
    result = fit(model, image_rows(rows), image_rows(4), config, cross_entropy_loss,
                 stage="test", seed=0, runtime=Runtime())
    assert result.epochs_run == epochs
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
