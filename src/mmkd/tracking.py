"""Experiment tracking: TensorBoard event files in each run folder, and MLflow as an option.

TensorBoard (`<run>/tensorboard/`, open with `tensorboard --logdir <run>/tensorboard`):

- one folder per training stage (teacher, distill, finetune, baseline) with every
  number of each epoch's record: `train/<loss term>`, `val/<metric>`, `time/epoch_seconds`;
- `report/`, written by the report stage: the test scores, calibration error and
  agreement as scalars, every report figure as an image, and the teacher's and the
  student's fused embeddings of the test rows in the embedding projector, labelled.

MLflow (`tracking.mlflow: true`): one MLflow run per mmkd run, with the config as
parameters, the test scores and each stage's curves as metrics, and student.onnx,
metrics.json, config.yaml and the report as artifacts.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

TENSORBOARD_FOLDER = "tensorboard"


def scalar_tag(name: str) -> str:
    """Return the TensorBoard tag of one field of an epoch record: val_accuracy -> val/accuracy, hinton -> train/hinton."""
    if name.startswith("val_"):
        return f"val/{name.removeprefix('val_')}"
    if name == "seconds":
        return "time/epoch_seconds"
    return f"train/{name}"


class EpochScalars:
    """TensorBoard event files of one training stage, one step per epoch.

    The writer opens at the first epoch it is given, purging any events at or after that
    epoch, so a resumed stage does not leave the killed run's later epochs behind.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writer = None

    def log(self, record: dict) -> None:
        """Write every number of an epoch's record at step = its epoch."""
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(str(self.folder), purge_step=record["epoch"])
        for name, value in record.items():
            if name != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(scalar_tag(name), value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_report_events(report, folder: Path, metrics: dict | None) -> Path:
    """Write the report's scalars, figures and embeddings as TensorBoard events in `folder`, replacing earlier ones."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(str(folder))
    try:
        if metrics is not None:
            for role in ("teacher", "student", "baseline", "onnx"):
                for name in ("accuracy", "macro_f1"):
                    if name in metrics[role]["test"]:
                        writer.add_scalar(f"test/{role}_{name}", metrics[role]["test"][name], 0)
        numbers = report.numbers
        for role, result in numbers.get("calibration", {}).items():
            writer.add_scalar(f"calibration/{role}_ece", result["ece"], 0)
        if "agreement" in numbers:
            writer.add_scalar("test/teacher_student_agreement", numbers["agreement"]["overall"], 0)
        for figure in report.figures:
            pixels = np.asarray(Image.open(io.BytesIO(figure.png)).convert("RGB"))
            writer.add_image(f"report/{figure.name}", pixels, 0, dataformats="HWC")
        for role, embeddings in report.embeddings.items():
            writer.add_embedding(embeddings, metadata=report.embedding_labels, tag=f"{role}_fused_embedding")
    finally:
        writer.close()
    return folder


def _flatten(values: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested settings to dotted keys, as MLflow parameters (each value at most 6,000 characters)."""
    if isinstance(values, dict):
        flat: dict[str, str] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): json.dumps(values)[:6000] if not isinstance(values, str) else values[:6000]}


def log_to_mlflow(run_dir: Path, config, metrics: dict, histories: dict[str, list[dict]], *,
                  default_root: Path) -> str:
    """Record a finished run in MLflow and return the MLflow run id.

    The tracking URI is tracking.mlflow_uri, or a SQLite store at <default_root>/mlflow.db
    with artifacts under <default_root>/mlartifacts. The experiment is
    tracking.mlflow_experiment or the config's name, created when missing.

    Raises:
        ConfigError: mlflow is not installed.
    """
    from mmkd.errors import ConfigError

    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("tracking.mlflow is true but MLflow is not installed: pip install 'mmkd[mlflow]', "
                          "or set tracking.mlflow to false") from None

    tracking = config.tracking
    uri = tracking.mlflow_uri or f"sqlite:///{(default_root / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    name = tracking.mlflow_experiment or config.name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None if tracking.mlflow_uri else (default_root / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_dir.name,
                            tags={"mmkd.run_dir": str(run_dir), "mmkd.version": metrics["run"]["mmkd_version"]})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(key, value) for key, value in _flatten(config.result_settings()).items()]
    scores = [Metric(f"test_{role}_{name}", metrics[role]["test"][name], now, 0)
              for role in ("teacher", "student", "baseline", "onnx") for name in ("accuracy", "macro_f1")
              if name in metrics[role]["test"]]
    curves = [Metric(f"{stage}_{field}", value, now, record["epoch"])
              for stage, history in histories.items() for record in history
              for field, value in record.items() if field != "epoch" and isinstance(value, int | float)]
    try:
        # MLflow takes at most 100 parameters and 1,000 metrics in one batch.
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        for start in range(0, len(scores + curves), 1000):
            client.log_batch(run_id, metrics=(scores + curves)[start : start + 1000])
        for name in ("student.onnx", "metrics.json", "config.yaml", "report/report.html"):
            if (run_dir / name).is_file():
                folder = str(Path(name).parent)
                client.log_artifact(run_id, str(run_dir / name), artifact_path=None if folder == "." else folder)
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id
