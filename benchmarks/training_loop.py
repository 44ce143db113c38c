"""Throughput of mmkd's distillation loop against a minimal hand-written PyTorch loop doing the same work.

Usage:
    python benchmarks/training_loop.py --rows 2000 --epochs 3 --repeats 3

Both loops train the demo's audio-visual student on the distillation objective (Hinton
plus MSE against stored teacher outputs) with AdamW and a one-cycle schedule, in
batches of the demo's size, and score the validation rows after each epoch. The rows
are generated with the shapes of the audio-visual digits (28x28 images, 1 s at 8 kHz);
throughput does not depend on their content. mmkd's loop is `mmkd.training.fit`, timed
twice: with its resumable state saved every 200 steps and at each epoch's end (the
pipeline's setting), and without. Runs alternate, and the median of the repeats is
reported, as rows per second and as the ratio to the hand-written loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def generated_rows(count: int, seed: int):
    import torch

    from mmkd.data.loading import TensorDataset

    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        inputs={"image": torch.randn(count, 1, 28, 28, generator=generator),
                "audio": 0.1 * torch.randn(count, 8000, generator=generator)},
        mask=torch.ones(count, 2, dtype=torch.bool), labels=torch.randint(0, 10, (count,), generator=generator),
        ids=[str(i) for i in range(count)], splits=["train"] * count, keys=[str(i) for i in range(count)],
        classes=[str(c) for c in range(10)], modalities=["image", "audio"],
    )


def student_and_objective(config, rows: int):
    import torch

    from mmkd.checkpoints import build_model
    from mmkd.distillation import DistillationObjective

    torch.manual_seed(0)
    student = build_model(config, "student", [str(c) for c in range(10)])
    generator = torch.Generator().manual_seed(1)
    objective = DistillationObjective(
        config.distill.losses, student_dim=student.embedding_dim, teacher_dim=128,
        teacher_logits=torch.randn(rows, 10, generator=generator),
        teacher_embeddings=torch.randn(rows, 128, generator=generator),
    )
    return student, objective


def hand_written(student, objective, train, val, *, epochs: int, batch_size: int, lr: float) -> None:
    """Do the work of `fit` written out: shuffled batches, AdamW, one-cycle, validation each epoch."""
    import torch

    parameters = [p for m in (student, objective) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    steps = -(-len(train) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    inputs, val_inputs = train.model_inputs(), val.model_inputs()
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        student.train()
        objective.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            rows = order[start:start + batch_size]
            batch = tuple(x[rows] for x in inputs)
            logits, embedding = student(*batch)
            loss, _ = objective((logits, embedding), (batch, train.labels[rows], rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        student.eval()
        with torch.no_grad():
            logits = torch.cat([student(*(x[i:i + 256] for x in val_inputs))[0] for i in range(0, len(val), 256)])
            float((logits.argmax(1) == val.labels).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="Training rows.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per timed run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each loop.")
    parser.add_argument("--out", type=Path, default=None, help="Write the figures here as JSON.")
    args = parser.parse_args(argv)

    import mmkd  # noqa: F401  (offline defaults)
    import torch

    from mmkd.config import TrainConfig, config_from_dict
    from mmkd.demo import write_demo_config
    from mmkd.train_state import TrainingState
    from mmkd.training import Runtime, fit

    with tempfile.TemporaryDirectory() as folder:
        import yaml

        raw = yaml.safe_load(write_demo_config(Path(folder), quick=False).read_text(encoding="utf-8"))
        config = config_from_dict(raw, base_dir=Path(folder))
    batch_size, lr = config.distill.train.batch_size, config.distill.train.lr
    train, val = generated_rows(args.rows, 2), generated_rows(max(64, args.rows // 10), 3)
    schedule = TrainConfig(epochs=args.epochs, batch_size=batch_size, lr=lr, patience=args.epochs)

    def timed(kind: str) -> float:
        student, objective = student_and_objective(config, args.rows)
        started = time.perf_counter()
        if kind == "hand-written":
            hand_written(student, objective, train, val, epochs=args.epochs, batch_size=batch_size, lr=lr)
        else:
            with tempfile.TemporaryDirectory() as state_folder:
                state = TrainingState(Path(state_folder), stage="distill", config_hash="benchmark") \
                    if kind == "mmkd" else None
                fit(student, train, val, schedule, objective, stage="distill", seed=0, runtime=Runtime(),
                    extra_modules=[objective], state=state)
        return args.rows * args.epochs / (time.perf_counter() - started)

    kinds = ["hand-written", "mmkd", "mmkd without saved state"]
    timed("hand-written")  # untimed: first-call costs of the process
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            rates[kind].append(timed(kind))
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    result = {
        "rows": args.rows, "epochs": args.epochs, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "rows_per_second": medians, "all_rows_per_second": rates,
        "ratio": medians["mmkd"] / medians["hand-written"],
        "ratio_without_saved_state": medians["mmkd without saved state"] / medians["hand-written"],
    }
    for kind in kinds:
        print(f"{kind:>26}: {medians[kind]:8.1f} rows/s  (runs: {', '.join(f'{r:.1f}' for r in rates[kind])})")
    print(f"mmkd / hand-written: {result['ratio']:.3f}; without saved state: {result['ratio_without_saved_state']:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
