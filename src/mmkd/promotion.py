"""The model registry and the promotion gate: a retrained student replaces the current one only if it is not worse.

A registry folder holds:

- `current.json`: the promoted model, switched atomically by renaming a new file onto it;
- `models/<run name>/`: each promoted student's ONNX model and metrics;
- `history.jsonl`: every decision, promoted or not, with both scores and the reason.

Both students are scored on the candidate run's test split, so a change of data never
makes an old score look better or worse than it is.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmkd.data.loading import TensorDataset
from mmkd.runs import atomic_write_json


def read_current(registry: Path) -> dict[str, Any] | None:
    """Return the registry's current model record, or None before the first promotion."""
    path = Path(registry) / "current.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_history(registry: Path) -> list[dict[str, Any]]:
    """Return every recorded decision, oldest first."""
    path = Path(registry) / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def onnx_accuracy(onnx_path: Path, data: TensorDataset) -> float:
    """Return the accuracy of an exported student on `data`, run by ONNX Runtime on the CPU.

    Raises:
        ValueError: the model predicts other labels than the data has.
    """
    import onnxruntime as ort

    from mmkd.onnx_export import run_onnx

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    labels = json.loads(session.get_modelmeta().custom_metadata_map.get("labels", "null"))
    if labels != data.classes:
        raise ValueError(f"{onnx_path} predicts labels {labels}, but the test data has {data.classes}")
    logits, _ = run_onnx(session, data)
    return float((logits.argmax(axis=1) == data.labels.numpy()).mean())


def decide(candidate_accuracy: float, current_accuracy: float | None, min_improvement: float) -> tuple[bool, str]:
    """Return (promote, reason) for a candidate scored against the current model on the same rows."""
    if current_accuracy is None:
        return True, "no model has been promoted yet"
    gain = candidate_accuracy - current_accuracy
    # Scores on a finite test set are sums of 1/n; tolerate float round-off at the boundary.
    if gain >= min_improvement - 1e-12:
        return True, f"test accuracy {candidate_accuracy:.4f} vs {current_accuracy:.4f} (gain {gain:+.4f} >= {min_improvement:.4f})"
    return False, f"test accuracy {candidate_accuracy:.4f} vs {current_accuracy:.4f} (gain {gain:+.4f} < {min_improvement:.4f})"


def _append_history(registry: Path, record: dict[str, Any]) -> None:
    with (registry / "history.jsonl").open("a", encoding="utf-8") as history:
        history.write(json.dumps(record, sort_keys=True) + "\n")


def promote_if_better(run_dir: Path, registry: Path, test: TensorDataset, *, min_improvement: float) -> dict[str, Any]:
    """Score the run's student and the current one on `test`, record the decision and apply it.

    Args:
        run_dir: A finished run folder with student.onnx and metrics.json.
        registry: The registry folder; created on first use.
        test: The run's test split.
        min_improvement: Accuracy the candidate must gain to replace the current model.

    Returns:
        The decision record that was appended to history.jsonl.
    """
    run_dir, registry = Path(run_dir), Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    candidate_onnx = run_dir / "student.onnx"
    candidate_accuracy = onnx_accuracy(candidate_onnx, test)

    current = read_current(registry)
    current_accuracy, comparable = None, True
    if current is not None:
        try:
            current_accuracy = onnx_accuracy(registry / current["onnx"], test)
        except ValueError as exc:
            comparable = False
            reason = f"not comparable, the current model stays: {exc}"
    if comparable:
        promoted, reason = decide(candidate_accuracy, current_accuracy, min_improvement)
    else:
        promoted = False

    record = {
        "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "candidate": run_dir.name, "candidate_run_dir": str(run_dir), "candidate_accuracy": candidate_accuracy,
        "current": current["model_id"] if current else None, "current_accuracy": current_accuracy,
        "test_rows": len(test), "min_improvement": min_improvement, "promoted": promoted, "reason": reason,
    }
    if promoted:
        model_dir = registry / "models" / run_dir.name
        model_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidate_onnx, model_dir / "student.onnx")
        if (run_dir / "metrics.json").exists():
            shutil.copyfile(run_dir / "metrics.json", model_dir / "metrics.json")
        atomic_write_json(registry / "current.json", {
            "model_id": run_dir.name, "run_dir": str(run_dir), "onnx": f"models/{run_dir.name}/student.onnx",
            "test_accuracy": candidate_accuracy, "promoted_at": record["decided_at"],
            "previous": current["model_id"] if current else None,
        })
    _append_history(registry, record)
    return record


def summary_markdown(record: dict[str, Any], registry: Path) -> str:
    """Describe a promotion decision for a Prefect markdown artifact."""
    verdict = "promoted" if record["promoted"] else "not promoted"
    current = record["current"] or "none"
    current_accuracy = "n/a" if record["current_accuracy"] is None else f"{record['current_accuracy']:.4f}"
    return (
        f"## Student {verdict}\n\n{record['reason']}.\n\n"
        "| | model | test accuracy |\n| --- | --- | ---: |\n"
        f"| candidate | {record['candidate']} | {record['candidate_accuracy']:.4f} |\n"
        f"| current | {current} | {current_accuracy} |\n\n"
        f"Scored on {record['test_rows']} test rows. Registry: `{registry}`\n"
    )
