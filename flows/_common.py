"""Helpers shared by the stage flows: the run folder's layout and loading the run's inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError

from mmkd.augment import Augmenter
from mmkd.config import RunConfig, load_config
from mmkd.data.loading import TensorDataset, decode_to_cache, load_decoded
from mmkd.features import FeatureStore
from mmkd.distributed import is_main_process
from mmkd.tracking import TENSORBOARD_FOLDER, EpochScalars
from mmkd.train_state import TrainingState

# A worker's flow run process sets up logging before it imports mmkd, leaving mmkd's logger
# at the root's WARNING level. INFO keeps the per-epoch lines in the run's logs.
if logging.getLogger("mmkd").level == logging.NOTSET:
    logging.getLogger("mmkd").setLevel(logging.INFO)


@dataclass(frozen=True)
class RunPaths:
    """Paths of one pipeline run's files. The run folder's parent contains the shared caches."""

    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def teacher(self) -> Path:
        return self.run_dir / "teacher.pt"

    @property
    def distilled(self) -> Path:
        return self.run_dir / "student_distilled.pt"

    @property
    def student(self) -> Path:
        return self.run_dir / "student.pt"

    @property
    def baseline(self) -> Path:
        return self.run_dir / "baseline.pt"

    @property
    def student_onnx(self) -> Path:
        return self.run_dir / "student.onnx"

    @property
    def teacher_onnx(self) -> Path:
        return self.run_dir / "teacher.onnx"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.json"

    @property
    def benchmark(self) -> Path:
        return self.run_dir / "benchmark.json"

    @property
    def tensor_cache(self) -> Path:
        return self.run_dir.parent / "cache"

    def training_state(self, stage: str, config: RunConfig) -> TrainingState:
        """Return the resumable state of one training stage: teacher, distill, finetune or baseline."""
        # The number of processes changes no result, so a stage killed under torchrun may resume in one process.
        one_process = config.model_copy(update={"distill": config.distill.model_copy(update={"nproc": 1})})
        return TrainingState(self.run_dir / "checkpoints" / stage, stage=stage, config_hash=one_process.fingerprint())

    def tensorboard(self, config: RunConfig) -> Path | None:
        """Return the folder of the run's TensorBoard events, or None when tracking.tensorboard is off."""
        return self.run_dir / TENSORBOARD_FOLDER if config.tracking.tensorboard else None

    def feature_store(self, config: RunConfig) -> Path:
        return config.feature_store or self.run_dir.parent / "feature-store"


def _is_transient_io_error(task, task_run, state) -> bool:
    """Return whether a failed state carries an OS error, which a retry may clear.

    A DataError names a broken row, which stays broken however often it is read.
    """
    try:
        state.result()
    except OSError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(name="decode-dataset", description="Decode the run's manifest into the tensor cache, or find it there.",
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=_is_transient_io_error, tags=["io"])
def decode_dataset(config_path: str, cache_dir: str) -> str:
    """Return the path of the decoded tensors of the config's data; a task returns no tensors."""
    return str(decode_to_cache(load_config(config_path).data, Path(cache_dir)))


def load_run_inputs(run_dir: str) -> tuple[RunPaths, RunConfig, TensorDataset]:
    """Read the run's resolved config and its decoded dataset."""
    paths = RunPaths(Path(run_dir))
    config = load_config(paths.config)
    dataset = load_decoded(Path(decode_dataset(str(paths.config), str(paths.tensor_cache))))
    return paths, config, dataset


def open_store(paths: RunPaths, config: RunConfig, teacher_fingerprint: str, *, own_teacher: bool = True) -> FeatureStore:
    """Open a teacher's feature store at the configured dtype; the run's own teacher's also keeps extract.layers."""
    layers = list(config.extract.layers) if own_teacher else None
    return FeatureStore(paths.feature_store(config), teacher_fingerprint, dtype=config.extract.dtype, layers=layers)


def augmenter_for(config: RunConfig, model) -> Augmenter:
    """Return the run's augmentation of training rows, for `model`'s modalities."""
    return Augmenter(config.augment, list(model.modalities), config.data.image, config.data.audio.hop_length)


def seed_everything(seed: int) -> None:
    """Seed torch so that model initialisation and batch order repeat."""
    torch.manual_seed(seed)


def flow_logger() -> logging.Logger | logging.LoggerAdapter:
    """Return the Prefect run logger, or a plain logger when a flow is called through `.fn()`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mmkd.flows")


class EpochProgress:
    """A Prefect progress artifact that advances with one training stage's epochs.

    Outside a flow or task run (for example when a flow is called through `.fn()`), it
    does nothing.
    """

    def __init__(self, stage: str, epochs: int, *, tensorboard: Path | None = None):
        self.stage, self.epochs, self.artifact_id = stage, epochs, None
        # Only the first process writes events: under torchrun every process calls this.
        self.scalars = EpochScalars(tensorboard / stage) if tensorboard is not None and is_main_process() else None
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = create_progress_artifact(0.0, description=f"{stage}: 0 of {epochs} epochs")

    def __call__(self, record: dict) -> None:
        """Move the bar to the epoch in `record`, the value `fit` passes to `on_epoch`, and log its scalars."""
        if self.scalars is not None:
            self.scalars.log(record)
        self._update(100.0 * record["epoch"] / self.epochs,
                     f"{self.stage}: {record['epoch']} of {self.epochs} epochs, val accuracy {record['val_accuracy']:.4f}")

    def finish(self, epochs_run: int) -> None:
        """Fill the bar; early stopping ends a stage before its last epoch."""
        stopped = f", stopped early after {epochs_run}" if epochs_run < self.epochs else ""
        planned = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''} planned"
        self._update(100.0, f"{self.stage}: done{stopped} ({planned})")
        if self.scalars is not None:
            self.scalars.close()

    def _update(self, progress: float, description: str) -> None:
        if self.artifact_id is None:
            return
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, progress, description=description)
