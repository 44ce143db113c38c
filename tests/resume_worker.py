"""A distillation stage to kill and resume: run by tests/test_resume.py in its own process.

Usage: python tests/resume_worker.py STATE_DIR WEIGHTS_OUT

It trains a small audio-visual student against fixed teacher outputs with a saved state
in STATE_DIR, printing "training" when the loop starts, and writes the final weights of
the student and of the loss terms to WEIGHTS_OUT. Every random draw comes from fixed
seeds, so a run killed and resumed must end with the weights of a run left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mmkd.config import AudioConfig, DistillConfig, ImageConfig, StudentConfig, TrainConfig
from mmkd.data.loading import TensorDataset
from mmkd.distillation import DistillationObjective
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.train_state import TrainingState
from mmkd.training import Runtime, fit

ROWS, VAL_ROWS, CLASSES = 192, 32, 4
# Long enough for several kills to land in the loop: 16 epochs of 24 steps, a state saved after each.
SCHEDULE = TrainConfig(epochs=16, batch_size=8, lr=0.01, patience=16, schedule="cosine", grad_clip_norm=5.0,
                       ema_decay=0.9, checkpoint_every_steps=1)


def rows(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    audio = AudioConfig()
    mask = torch.rand(count, 2, generator=generator) > 0.2
    return TensorDataset(
        inputs={"image": torch.randn(count, 1, 28, 28, generator=generator),
                "audio": torch.randn(count, int(audio.sample_rate_hz * audio.max_seconds), generator=generator)},
        mask=mask, labels=torch.randint(0, CLASSES, (count,), generator=generator),
        ids=[str(i) for i in range(count)], splits=["train"] * count, keys=[str(i) for i in range(count)],
        classes=[str(c) for c in range(CLASSES)], modalities=["image", "audio"],
    )


def main(state_dir: Path, weights_out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = MultimodalClassifier(
        StudentConfig(image_encoder={"width": 4, "blocks": [1]}, audio_encoder={"width": 4, "blocks": [1]},
                      embed_dim=8, dropout=0.3),
        modalities=["image", "audio"], num_classes=CLASSES, image=ImageConfig(), audio=AudioConfig(),
    )
    generator = torch.Generator().manual_seed(1)
    objective = DistillationObjective(
        DistillConfig().losses, student_dim=student.embedding_dim, teacher_dim=12,
        teacher_logits=torch.randn(ROWS, CLASSES, generator=generator),
        teacher_embeddings=torch.randn(ROWS, 12, generator=generator),
    )
    state = TrainingState(state_dir, stage="distill", config_hash="resume-worker")
    print("training", flush=True)
    result = fit(student, rows(ROWS, 2), rows(VAL_ROWS, 3), SCHEDULE, objective, stage="distill", seed=5,
                 runtime=Runtime(), extra_modules=[objective], state=state)
    torch.save({"student": student.state_dict(), "objective": objective.state_dict(),
                "resumed": result.resumed, "history": result.history}, weights_out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
