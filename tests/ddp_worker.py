"""Distillation of a small student in one process, or in several under torchrun: run by tests/test_distributed.py.

Usage: python tests/ddp_worker.py WEIGHTS_OUT              (one process)
       torchrun --nproc-per-node 2 tests/ddp_worker.py WEIGHTS_OUT

The student has neither batch norm nor dropout, whose statistics and masks differ between
one process and several by design. What is left to differ is the order in which the
processes' gradients are added up, so the weights must agree to float precision.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mmkd.config import DistillConfig, TrainConfig
from mmkd.data.loading import TensorDataset
from mmkd.distillation import DistillationObjective
from mmkd.training import Runtime, fit

ROWS, CLASSES = 96, 3
SCHEDULE = TrainConfig(epochs=3, batch_size=16, lr=0.005, patience=3, schedule="cosine", grad_clip_norm=10.0)


class FlatStudent(nn.Module):
    """An image classifier without batch norm or dropout, with the (logits, embedding) interface."""

    modalities = ["image"]

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.Tanh())
        self.head = nn.Linear(16, CLASSES)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.body(image)
        return self.head(embedding), embedding


def rows(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        inputs={"image": torch.randn(count, 1, 28, 28, generator=generator)},
        mask=torch.ones(count, 1, dtype=torch.bool), labels=torch.randint(0, CLASSES, (count,), generator=generator),
        ids=[str(i) for i in range(count)], splits=["train"] * count, keys=[str(i) for i in range(count)],
        classes=[str(c) for c in range(CLASSES)], modalities=["image"],
    )


def main(weights_out: Path) -> None:
    torch.set_num_threads(1)
    distributed = "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    student = FlatStudent()
    generator = torch.Generator().manual_seed(1)
    objective = DistillationObjective(
        DistillConfig().losses, student_dim=16, teacher_dim=12,
        teacher_logits=torch.randn(ROWS, CLASSES, generator=generator),
        teacher_embeddings=torch.randn(ROWS, 12, generator=generator),
    )
    result = fit(student, rows(ROWS, 2), rows(24, 3), SCHEDULE, objective, stage="distill", seed=7,
                 runtime=Runtime(), extra_modules=[objective])
    if not distributed or dist.get_rank() == 0:
        torch.save({"student": student.state_dict(), "objective": objective.state_dict(),
                    "history": result.history}, weights_out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
