"""Helpers shared by the stage flows: the run folder's layout and loading the run's inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from mmkd.config import RunConfig, load_config
from mmkd.data.loading import TensorDataset, load_dataset


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

    def feature_store(self, config: RunConfig) -> Path:
        return config.feature_store or self.run_dir.parent / "feature-store"


@task(name="load-run-inputs", cache_policy=NO_CACHE)
def load_run_inputs(run_dir: str) -> tuple[RunPaths, RunConfig, TensorDataset]:
    """Read the run's resolved config and decode (or reuse) its dataset."""
    paths = RunPaths(Path(run_dir))
    config = load_config(paths.config)
    dataset = load_dataset(config.data, cache_dir=paths.tensor_cache)
    return paths, config, dataset


def seed_everything(seed: int) -> None:
    """Seed torch so that model initialisation and batch order repeat."""
    torch.manual_seed(seed)


def flow_logger() -> logging.Logger | logging.LoggerAdapter:
    """Return the Prefect run logger, or a plain logger when a flow is called through `.fn()`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mmkd.flows")
