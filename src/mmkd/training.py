"""Training loops and the metrics every stage reports.

`fit` trains one model on the device and precision the config sets, with the
configured schedule, gradient clipping, weight average and early stopping. It saves its
state every few steps and at each epoch's end (mmkd.train_state), and continues from a
state saved before. On the CPU with a fixed seed, a stage killed and resumed any number
of times ends with the same weights as one that was never stopped.
Launched by torchrun, it trains with DistributedDataParallel, each process reading its
share of every batch.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, DistributedSampler
from tqdm.auto import tqdm

from mmkd.augment import Adversary, Augmenter
from mmkd.config import TrainConfig
from mmkd.data.loading import TensorDataset
from mmkd.train_state import TrainingState, capture_rng, restore_rng

logger = logging.getLogger(__name__)

# A batch: the model's positional inputs (modalities then mask), labels and row positions.
Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]
# Maps (model outputs, batch) to the total loss and its named terms.
LossFn = Callable[[tuple[torch.Tensor, torch.Tensor], Batch], tuple[torch.Tensor, dict[str, float]]]


def resolve_device(choice: str) -> torch.device:
    """Return the device for `choice`; "auto" picks CUDA, then Apple's MPS, then the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available; use auto or cpu")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device: mps was requested but this machine has no MPS device; use auto or cpu")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        if dist.is_available() and dist.is_initialized():
            return torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        return torch.device("cuda")
    if choice in ("mps", "auto") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(choice: str, device: torch.device) -> str:
    """Return "fp32", "bf16" or "fp16" for the config's `precision` on `device`."""
    if choice == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if choice == "fp16" and device.type == "cpu":
        raise ValueError("precision: fp16 needs a GPU (its gradient scaler is for CUDA and MPS); use bf16 or fp32 on the CPU")
    return choice


@dataclass(frozen=True)
class Runtime:
    """Training settings of a stage: device, precision, memory format and compilation."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_config(cls, config) -> Runtime:
        """Resolve the run config's device, precision, channels_last and compile settings."""
        device = resolve_device(config.device)
        return cls(device, resolve_precision(config.precision, device), config.channels_last, config.compile)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def iterate_batches(data: TensorDataset, batch_size: int):
    """Yield batches of `data` in row order: (inputs, labels, row positions)."""
    inputs = data.model_inputs()
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        yield tuple(x[rows] for x in inputs), data.labels[rows], rows


def epoch_batches(rows: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Return this process's batches of row positions for one epoch.

    The order is drawn by DistributedSampler from `seed` and `epoch` alone, so a resumed
    stage finds the same batches. With `world` processes, each takes every world-th row
    of the shuffled order and `batch_size // world` rows per step: together they see
    the same batches of `batch_size` rows as one process.
    """
    sampler = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, max(1, batch_size // world), drop_last=False))


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
    """Outcome of a training stage: epochs run, the best epoch and its validation scores."""

    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    monitor: str = "val_accuracy"
    best_value: float = 0.0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0

    def summary(self) -> dict:
        """Return what a checkpoint records of its training: epochs, best epoch and scores, time, resumptions, and
        each epoch's losses and validation scores."""
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "monitor": self.monitor,
            "best_value": self.best_value,
            "seconds": self.seconds,
            "resumed": self.resumed,
            "history": self.history,
        }


class _Step(nn.Module):
    """One training forward pass, model and loss, as a module.

    DistributedDataParallel wraps this rather than the model alone, so the gradients of
    the modules trained beside the model (a loss term's projection) are averaged too.
    """

    def __init__(self, model: nn.Module, extra_modules: list[nn.Module], loss_fn: LossFn, runtime: Runtime):
        super().__init__()
        self.model, self.extras = model, nn.ModuleList(extra_modules)
        # Tuples keep the compiled view and the loss function from registering as submodules.
        self._forward = (torch.compile(model) if runtime.compile else model,)
        self._loss_fn = (loss_fn,)
        self.device_type, self.dtype = runtime.device.type, runtime.autocast_dtype

    def forward(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, rows: torch.Tensor):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            logits, embedding = self._forward[0](*inputs)
        return self._loss_fn[0]((logits.float(), embedding.float()), (inputs, labels, rows))


def _build_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Return the learning rate schedule over `total_steps` optimiser steps."""
    if config.schedule == "cosine":
        warmup = min(round(config.warmup_fraction * total_steps), total_steps - 1)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
        if warmup <= 0:
            return decay
        rise = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [rise, decay], milestones=[warmup])
    # The one-cycle schedule needs a step or more in each of its two phases; shorter runs keep a constant rate.
    if config.schedule == "one_cycle" and total_steps >= 3:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=min(0.5, max(0.2, 2.5 / total_steps))
        )
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _validation_scores(model: nn.Module, val: TensorDataset, device: torch.device) -> dict[str, float]:
    """Return accuracy, macro-F1 and cross-entropy of `model` on the validation rows."""
    if not len(val):
        return {"val_accuracy": 0.0, "val_macro_f1": 0.0, "val_loss": 0.0}
    logits, _ = predict(model, val, device=device)
    metrics = classification_metrics(logits, val.labels, [str(i) for i in range(logits.shape[1])])
    return {"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
            "val_loss": float(nn.functional.cross_entropy(logits, val.labels))}


def _distributed() -> tuple[int, int]:
    """Return (rank, world size): (0, 1) unless torchrun started a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit(
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    config: TrainConfig,
    loss_fn: LossFn,
    *,
    stage: str,
    seed: int,
    runtime: Runtime,
    extra_modules: list[nn.Module] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    state: TrainingState | None = None,
    augmenter: Augmenter | None = None,
) -> FitResult:
    """Train `model` with AdamW, early-stopped on the monitored validation metric.

    The weights of the best validation epoch are restored before returning (those of
    the weight average, with `config.ema_decay`).

    Args:
        model: The classifier, on `runtime.device`; its forward returns (logits, embedding).
        train: Rows to train on.
        val: Rows that select the best epoch.
        config: Epochs, batch size, learning rate and schedule, clipping, averaging, early
            stopping, adversarial copies.
        loss_fn: Maps the model outputs and the batch to the loss and its named terms.
        stage: Name used in log lines, e.g. "teacher".
        seed: Seeds the batch order.
        runtime: Device, precision, memory format and compilation.
        extra_modules: Modules trained alongside, e.g. a loss term's projection.
        on_epoch: Called with each epoch's record, e.g. to publish progress.
        state: Where to save the training state, and to resume from when it contains one.
        augmenter: Random changes to each training batch; used when `config.augment` is true.
    """
    # A student may read fewer modalities than the rows hold.
    train, val = train.with_modalities(model.modalities), val.with_modalities(model.modalities)
    blank = int((~train.mask.any(dim=1)).sum())
    if blank:
        logger.warning("%s: %d of %d training rows have none of the modalities %s; they teach only the head's bias",
                       stage, blank, len(train), ", ".join(model.modalities))
    trainer = _Trainer(model, train, config, loss_fn, stage=stage, seed=seed, runtime=runtime,
                       extra_modules=extra_modules or [], state=state,
                       augmenter=augmenter if config.augment and augmenter is not None and augmenter.active else None)
    if trainer.augmenter is not None:
        trainer.augmenter.attach(model)
    try:
        while trainer.epoch <= config.epochs and not trainer.stopped:
            trainer.train_epoch()
            record = trainer.end_epoch(val)
            if on_epoch is not None:
                on_epoch(record)
    finally:
        if trainer.augmenter is not None:
            trainer.augmenter.detach()
    return trainer.finish()


class _Trainer:
    """The state of one `fit` call: modules, optimiser, schedule, position and record, and how to save them."""

    def __init__(self, model: nn.Module, train: TensorDataset, config: TrainConfig, loss_fn: LossFn, *, stage: str,
                 seed: int, runtime: Runtime, extra_modules: list[nn.Module], state: TrainingState | None,
                 augmenter: Augmenter | None):
        self.model, self.train, self.config, self.stage, self.seed = model, train, config, stage, seed
        self.runtime, self.extra_modules, self.state, self.augmenter = runtime, extra_modules, state, augmenter
        self.rank, self.world = _distributed()
        self.modules = [model, *extra_modules]
        if runtime.channels_last:
            model.to(memory_format=torch.channels_last)
        self.parameters = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = len(self._batches(epoch=0))
        self.scheduler = _build_schedule(self.optimizer, config, config.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
        self.average = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
                        if config.ema_decay else None)
        self.evaluated = self.average.module if self.average is not None else model
        self.single_step = _Step(model, extra_modules, loss_fn, runtime)
        self.step_module: nn.Module = self.single_step
        if self.world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.single_step, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                forward_sync_buffers=False,
            )
        self.adversary = Adversary(config.adversarial, model) if config.adversarial is not None else None
        self.inputs = train.model_inputs()

        # The position and the record so far: a fresh start, or the saved state's.
        self.epoch, self.step, self.global_step, self.resumed, self.seconds_before = 1, 0, 0, 0, 0.0
        self.totals: dict[str, float] = {}
        self.seen, self.history, self.stopped = 0, [], False
        self.best: dict = {"value": None, "epoch": 0, "accuracy": -1.0, "stale": 0, "weights": None}
        saved = state.load() if state is not None else None
        if saved is not None:
            self._restore(saved)
        self.started = time.perf_counter()

    def _batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.train), self.config.batch_size, seed=self.seed, epoch=epoch,
                             rank=self.rank, world=self.world)

    def _restore(self, saved: dict) -> None:
        for module, weights in zip(self.modules, saved["modules"], strict=True):
            module.load_state_dict(weights)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.average is not None:
            self.average.load_state_dict(saved["average"])
        restore_rng(saved["rng"])
        self.epoch, self.step, self.global_step = saved["epoch"], saved["step"], saved["global_step"]
        self.totals, self.seen, self.history = saved["totals"], saved["seen"], saved["history"]
        self.stopped, self.best = saved["stopped"], saved["best"]
        self.resumed, self.seconds_before = saved["resumed"] + 1, saved["seconds"]
        if self.rank == 0:
            logger.info("%s: resuming from %s at epoch %d, step %d of %d",
                        self.stage, self.state.path, self.epoch, self.step, self.steps_per_epoch)

    def _save(self) -> None:
        if self.state is None or self.rank != 0:
            return
        self.state.save({
            "modules": [m.state_dict() for m in self.modules], "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None, "rng": capture_rng(),
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step, "totals": self.totals,
            "seen": self.seen, "history": self.history, "stopped": self.stopped, "best": self.best,
            "resumed": self.resumed, "seconds": self.seconds_before + time.perf_counter() - self.started,
        })

    def train_epoch(self) -> None:
        """Train on the rest of this epoch's batches, in this epoch's order."""
        for module in self.modules:
            module.train()
        self.epoch_started = time.perf_counter()
        batches = self._batches(self.epoch)
        progress = tqdm(batches[self.step:], total=self.steps_per_epoch, initial=self.step,
                        desc=f"{self.stage} {self.epoch}/{self.config.epochs}", leave=False,
                        disable=self.rank != 0 or not sys.stderr.isatty())
        for rows in progress:
            self._train_step(torch.tensor(rows))
            self.step += 1
            self.global_step += 1
            if self.global_step % self.config.checkpoint_every_steps == 0 and self.step < len(batches):
                self._save()

    def _train_step(self, rows: torch.Tensor) -> None:
        config, device = self.config, self.runtime.device
        inputs = tuple(_to_device(x[rows], self.runtime) for x in self.inputs)
        labels = self.train.labels[rows].to(device, non_blocking=True)
        if self.augmenter is not None:
            inputs = self.augmenter(inputs)
        text_hook = None
        if self.adversary is not None:
            inputs, labels, rows = self.adversary.extend(self.single_step, inputs, labels, rows)
            text_hook = self.adversary.hook_training_pass()
        try:
            loss, terms = self.step_module(inputs, labels, rows)
        finally:
            if text_hook is not None:
                text_hook.remove()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, config.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            self.average.update_parameters(self.model)
        for name, value in {"loss": float(loss.detach()), **terms}.items():
            self.totals[name] = self.totals.get(name, 0.0) + value * len(rows)
        self.seen += len(rows)

    def end_epoch(self, val: TensorDataset) -> dict:
        """Score the epoch on the validation rows, keep the best weights, decide on stopping; return the record."""
        config = self.config
        if self.world > 1:
            self.totals, self.seen = _sum_over_processes(self.totals, self.seen, self.runtime.device)
            # Batch-norm statistics differ between processes, so validation uses the first one's.
            for buffer in self.evaluated.buffers():
                dist.broadcast(buffer.data, src=0)
        scores = _validation_scores(self.evaluated, val, self.runtime.device)
        record = {name: total / max(self.seen, 1) for name, total in self.totals.items()}
        record.update(epoch=self.epoch, **scores, seconds=time.perf_counter() - self.epoch_started)
        self.history.append(record)
        if self.rank == 0:
            terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in {*scores, "epoch", "seconds"})
            logger.info("%s epoch %d/%d: %s, val accuracy %.4f (%.1f s)",
                        self.stage, self.epoch, config.epochs, terms, scores["val_accuracy"], record["seconds"])
        value, best = scores[config.monitor], self.best
        if best["value"] is None or (value < best["value"] if config.monitor == "val_loss" else value > best["value"]):
            self.best = {"value": value, "epoch": self.epoch, "accuracy": scores["val_accuracy"], "stale": 0,
                         "weights": [copy.deepcopy(m.state_dict()) for m in [self.evaluated, *self.extra_modules]]}
        else:
            best["stale"] += 1
            if best["stale"] >= config.patience:
                self.stopped = True
                if self.rank == 0:
                    logger.info("%s: stopping early, no better %s for %d epochs",
                                self.stage, config.monitor, best["stale"])
        self.epoch, self.step, self.totals, self.seen = self.epoch + 1, 0, {}, 0
        self._save()
        return record

    def finish(self) -> FitResult:
        """Put the best epoch's weights back and return the outcome."""
        for module, weights in zip([self.model, *self.extra_modules], self.best["weights"], strict=True):
            module.load_state_dict(weights)
        self.model.eval()
        return FitResult(
            epochs_run=len(self.history), best_epoch=self.best["epoch"], best_val_accuracy=self.best["accuracy"],
            monitor=self.config.monitor, best_value=self.best["value"], history=self.history,
            seconds=self.seconds_before + time.perf_counter() - self.started, resumed=self.resumed,
        )


def _to_device(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Copy one batch input to the training device, pinned for an asynchronous copy to a GPU."""
    if runtime.device.type == "cuda":
        tensor = tensor.pin_memory()
    tensor = tensor.to(runtime.device, non_blocking=True)
    if runtime.channels_last and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _sum_over_processes(totals: dict[str, float], seen: int, device: torch.device) -> tuple[dict[str, float], int]:
    """Add up the epoch's loss totals and row counts of every process."""
    names = list(totals)  # the same loss terms, in the same order, in every process
    values = torch.tensor([totals[n] for n in names] + [float(seen)], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(values)
    return dict(zip(names, values[:-1].tolist(), strict=True)), int(values[-1])


def cross_entropy_loss(outputs: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain supervised loss on labels, for the teacher, the baseline and finetuning."""
    loss = nn.functional.cross_entropy(outputs[0], batch[1])
    return loss, {"cross_entropy": float(loss.detach())}


def supervised_loss(label_smoothing: float = 0.0) -> LossFn:
    """Return the cross-entropy on labels, with the given label smoothing."""
    if not label_smoothing:
        return cross_entropy_loss

    def smoothed(outputs: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = nn.functional.cross_entropy(outputs[0], batch[1], label_smoothing=label_smoothing)
        return loss, {"cross_entropy": float(loss.detach())}

    return smoothed
