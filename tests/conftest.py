"""Session-wide fixtures: an isolated Prefect home and test server, and small real datasets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

# Before Prefect is imported: a throw-away home, so tests never touch a user's profile or
# database, and nothing that reports usage or downloads models.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mmkd-test-prefect-home-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"

import mmkd  # noqa: E402  (applies the remaining offline defaults)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FSDD_DIR = SHARED_DATA / "fsdd"
MNIST_CSV = SHARED_DATA / "mnist" / "mnist_5k.csv.gz"


def require_shared_data() -> None:
    """Skip a test that needs the real data when it is absent, but fail under CI, where it must be."""
    if (FSDD_DIR / "recordings").is_dir() and MNIST_CSV.is_file():
        return
    message = f"the real data is not at {SHARED_DATA}: FSDD recordings and mnist_5k.csv.gz are expected there"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (SQLite in a temporary folder) for every test that needs it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def small_avdigits(tmp_path_factory) -> Path:
    """The audio-visual digits data, 12 recordings per digit (120 rows), built from the real files."""
    require_shared_data()
    from mmkd.data.avdigits import build_avdigits

    return build_avdigits(tmp_path_factory.mktemp("avdigits"), fsdd_dir=FSDD_DIR, mnist=MNIST_CSV, per_digit=12)


# A config small enough that every stage runs in seconds: tiny models, two epochs each.
TINY_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "teacher": {
        "image_encoder": {"width": 8, "blocks": [1, 1]},
        "audio_encoder": {"width": 8, "blocks": [1, 1]},
        "embed_dim": 32,
        "fusion": {"name": "attention", "params": {"dim": 32, "heads": 2}},
        "train": {"epochs": 2, "batch_size": 32, "patience": 2},
    },
    "student": {
        "image_encoder": {"width": 2, "blocks": [1]},
        "audio_encoder": {"width": 2, "blocks": [1]},
        "embed_dim": 8,
        "fusion": {"name": "concat"},
    },
    "distill": {"train": {"epochs": 2, "batch_size": 32, "patience": 2}},
    "finetune": {"train": {"epochs": 1, "batch_size": 32, "patience": 1}},
    "benchmark": {"warmup": 1, "iterations": 5, "batch_sizes": [1, 4], "audio_seconds": [0.5]},
    # 12 rows per digit leave some digits without a validation or test row.
    "validation": {"min_rows_per_class_per_split": 0},
}


def write_config(folder: Path, manifest: Path, **changes) -> Path:
    """Write TINY_CONFIG with the manifest and top-level `changes` to folder/config.yaml."""
    config = {**TINY_CONFIG, "data": {"manifest": str(manifest)}}
    for key, value in changes.items():
        # Sections are merged one level deep, so a test changes only the keys it names.
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path



def prepared_run(root: Path, manifest: Path, name: str, **changes):
    """Write TINY_CONFIG with `changes` and a run folder root/name holding it resolved; return (folder, config)."""
    from mmkd.config import load_config, save_config

    config = load_config(write_config(root / f"{name}-config", manifest, **changes))
    folder = root / name
    folder.mkdir()
    save_config(config, folder / "config.yaml")
    return folder, config

# Run mmkd's CLI in a fresh interpreter where importing torch or Prefect fails, as where neither is installed.
WITHOUT_TORCH_OR_PREFECT = (
    "import sys; sys.modules['torch'] = None; sys.modules['prefect'] = None; "
    "from mmkd.cli import main; sys.exit(main(sys.argv[1:]))"
)


def predict_without_torch(model: Path, manifest: Path, out: Path) -> list[dict]:
    """Run `mmkd predict MODEL --manifest MANIFEST --out OUT` without torch or Prefect; return the predictions."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH_OR_PREFECT, "predict", str(model), "--manifest", str(manifest),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def onnx_probabilities(model: Path, dataset):
    """Return the ONNX model's logits for every row of `dataset` and their softmax, computed here."""
    import numpy as np
    import onnxruntime as ort

    from mmkd.onnx_export import run_onnx

    logits, _ = run_onnx(ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]), dataset)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    return logits, probabilities / probabilities.sum(1, keepdims=True)
