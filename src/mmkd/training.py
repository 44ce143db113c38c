"""Training loops with early stopping, and the metrics every stage reports."""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from mmkd.config import TrainConfig
from mmkd.data.loading import TensorDataset

logger = logging.getLogger(__name__)

# A batch: the model's positional inputs (modalities then mask), labels and row positions.
Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]
# Maps (model outputs, batch) to the total loss and its named terms.
LossFn = Callable[[tuple[torch.Tensor, torch.Tensor], Batch], tuple[torch.Tensor, dict[str, float]]]


def resolve_device(choice: str) -> torch.device:
    """Return CUDA when asked or when `choice` is "auto" and a GPU is present, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available; use auto or cpu")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def iterate_batches(
    data: TensorDataset, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Yield batches of `data` in order, or in a random order drawn from `generator`."""
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    inputs = data.model_inputs()
    for start in range(0, len(data), batch_size):
        rows = order[start : start + batch_size]
        yield tuple(x[rows] for x in inputs), data.labels[rows], rows


@torch.no_grad()
def predict(model: nn.Module, data: TensorDataset, *, batch_size: int = 256, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the model's (logits, embeddings) for every row of `data`, on the CPU.

    The model reads only its own modalities of `data`.
    """
    data = data.with_modalities(model.modalities)
    device = device or torch.device("cpu")
    model.eval()
    logits, embeddings = [], []
    for inputs, _, _ in iterate_batches(data, batch_size):
        out_logits, out_embedding = model(*(x.to(device) for x in inputs))
        logits.append(out_logits.float().cpu())
        embeddings.append(out_embedding.float().cpu())
    return torch.cat(logits), torch.cat(embeddings)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Return accuracy, macro-F1 and per-class precision, recall, F1 and support."""
    predicted = logits.argmax(dim=1)
    per_class = {}
    f1_scores = []
    for index, name in enumerate(classes):
        true_positive = int(((predicted == index) & (labels == index)).sum())
        predicted_count = int((predicted == index).sum())
        support = int((labels == index).sum())
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support:
            f1_scores.append(f1)
    return {
        "accuracy": int((predicted == labels).sum()) / len(labels) if len(labels) else 0.0,
        "macro_f1": sum(f1_scores) / len(f1_scores) if f1_scores else 0.0,
        "examples": int(len(labels)),
        "per_class": per_class,
    }


@dataclass
class FitResult:
    """Outcome of a training stage: epochs run, the best epoch and its validation accuracy."""

    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """Return what a checkpoint records of its training: epochs, best epoch, accuracy, time."""
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "seconds": self.seconds,
        }


def fit(
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    config: TrainConfig,
    loss_fn: LossFn,
    *,
    stage: str,
    seed: int,
    device: torch.device,
    extra_modules: list[nn.Module] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train `model` with AdamW and a one-cycle schedule, early-stopped on validation accuracy.

    The weights of the best validation epoch are restored before returning.

    Args:
        model: The classifier; its forward returns (logits, embedding).
        train: Rows to train on.
        val: Rows that select the best epoch.
        config: Epochs, batch size, learning rate, weight decay and patience.
        loss_fn: Maps the model outputs and the batch to the loss and its named terms.
        stage: Name used in log lines, e.g. "teacher".
        seed: Seeds the batch order.
        device: Where to train.
        extra_modules: Modules trained alongside, e.g. a loss term's projection.
        on_epoch: Called with each epoch's record, e.g. to publish progress.
    """
    # A student may read fewer modalities than the rows hold.
    train, val = train.with_modalities(model.modalities), val.with_modalities(model.modalities)
    blank = int((~train.mask.any(dim=1)).sum())
    if blank:
        logger.warning("%s: %d of %d training rows have none of the modalities %s; they teach only the head's bias",
                       stage, blank, len(train), ", ".join(model.modalities))
    extra_modules = extra_modules or []
    parameters = [p for m in [model, *extra_modules] for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(train) // config.batch_size))
    total_steps = config.epochs * steps_per_epoch
    # The one-cycle schedule needs a step or more in each of its two phases; shorter runs keep a constant rate.
    scheduler: torch.optim.lr_scheduler.LRScheduler = (
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=min(0.5, max(0.2, 2.5 / total_steps))
        )
        if total_steps >= 3
        else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    )
    generator = torch.Generator().manual_seed(seed)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    best_state, best_accuracy, best_epoch, stale = None, -1.0, 0, 0
    history: list[dict] = []
    started = time.perf_counter()

    for epoch in range(1, config.epochs + 1):
        # One pass over the training rows in a fresh random order.
        model.train()
        for module in extra_modules:
            module.train()
        epoch_started = time.perf_counter()
        totals: dict[str, float] = {}
        batches = tqdm(
            iterate_batches(train, config.batch_size, shuffle=True, generator=generator),
            total=steps_per_epoch,
            desc=f"{stage} {epoch}/{config.epochs}",
            leave=False,
            disable=not sys.stderr.isatty(),
        )
        for inputs, labels, rows in batches:
            inputs = tuple(x.to(device, non_blocking=True) for x in inputs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                outputs = model(*inputs)
            loss, terms = loss_fn((outputs[0].float(), outputs[1].float()), (inputs, labels.to(device), rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for name, value in {"loss": float(loss.detach()), **terms}.items():
                totals[name] = totals.get(name, 0.0) + value * len(labels)

        # Validation accuracy decides the best epoch and when to stop.
        val_logits, _ = predict(model, val, device=device)
        val_accuracy = float((val_logits.argmax(1) == val.labels).float().mean()) if len(val) else 0.0
        record = {name: total / len(train) for name, total in totals.items()}
        record.update(epoch=epoch, val_accuracy=val_accuracy, seconds=time.perf_counter() - epoch_started)
        history.append(record)
        terms_text = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "val_accuracy", "seconds"))
        logger.info(
            "%s epoch %d/%d: %s, val accuracy %.4f (%.1f s)",
            stage, epoch, config.epochs, terms_text, val_accuracy, record["seconds"],
        )
        if on_epoch is not None:
            on_epoch(record)
        if val_accuracy > best_accuracy:
            best_accuracy, best_epoch, stale = val_accuracy, epoch, 0
            best_state = [copy.deepcopy(m.state_dict()) for m in [model, *extra_modules]]
        else:
            stale += 1
            if stale >= config.patience:
                logger.info("%s: stopping early, no better validation accuracy for %d epochs", stage, stale)
                break

    assert best_state is not None
    for module, state in zip([model, *extra_modules], best_state, strict=True):
        module.load_state_dict(state)
    model.eval()
    return FitResult(
        epochs_run=len(history),
        best_epoch=best_epoch,
        best_val_accuracy=best_accuracy,
        history=history,
        seconds=time.perf_counter() - started,
    )


def cross_entropy_loss(outputs: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain supervised loss on labels, for the teacher, the baseline and finetuning."""
    loss = nn.functional.cross_entropy(outputs[0], batch[1])
    return loss, {"cross_entropy": float(loss.detach())}
