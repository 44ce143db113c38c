"""The model registry and the promotion gate: a retrained student replaces the current one only if it is not worse.

A registry folder holds:

- `current.json`: the promoted model, switched atomically by renaming a new file onto it;
- `models/<run name>/`: each promoted student's ONNX model, metrics and record (whose
  `previous` names the model it replaced, which `rollback` restores);
- `history.jsonl`: every decision, promoted or not, with both scores and the reason, and
  every rollback.

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
from mmkd.errors import MmkdError
from mmkd.reports import p50
from mmkd.runs import atomic_write, atomic_write_json


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


def make_current(registry: Path, record: dict[str, Any]) -> None:
    """Switch the registry to the model that `record` describes, in one atomic rename.

    A process killed at any point leaves current.json naming either the old or the new
    model, both of whose files are in place.
    """
    atomic_write_json(Path(registry) / "current.json", record)


def rollback(registry: Path) -> dict[str, Any]:
    """Make the model promoted before the current one current again; return its record.

    Raises:
        MmkdError: the registry has no current model, or the current one was the first.
    """
    registry = Path(registry)
    current = read_current(registry)
    if current is None:
        raise MmkdError(f"Registry {registry} has no current.json: no model was promoted, so none can be rolled back.")
    if not current.get("previous"):
        raise MmkdError(f"Registry {registry}: {current['model_id']} was the first model promoted; there is no earlier one to restore.")
    earlier = json.loads((registry / "models" / current["previous"] / "record.json").read_text(encoding="utf-8"))
    make_current(registry, earlier)
    _append_history(registry, {
        "action": "rollback", "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "from": current["model_id"], "to": earlier["model_id"],
    })
    return earlier


def _student_p50_ms(run_dir: Path) -> float | None:
    """Return the ONNX student's batch-1 p50 latency from the run's benchmark.json, or None if not measured."""
    path = run_dir / "benchmark.json"
    if not path.exists():
        return None
    return p50(json.loads(path.read_text(encoding="utf-8")), "student", "onnxruntime", 1)


def promote_if_better(
    run_dir: Path, registry: Path, test: TensorDataset, *, min_improvement: float, max_p50_ms: float | None = None
) -> dict[str, Any]:
    """Score the run's student and the current one on `test`, record the decision and apply it.

    Args:
        run_dir: A finished run folder with student.onnx, metrics.json and benchmark.json.
        registry: The registry folder; created on first use.
        test: The run's test split.
        min_improvement: Accuracy the candidate must gain to replace the current model.
        max_p50_ms: Latency budget: a candidate whose ONNX batch-1 p50 exceeds it (or was
            not measured) is not promoted. None sets no budget.

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
    latency = _student_p50_ms(run_dir)
    if promoted and max_p50_ms is not None and (latency is None or latency > max_p50_ms):
        promoted = False
        measured = "was not measured" if latency is None else f"is {latency:.3f} ms"
        reason = f"over the latency budget: batch-1 p50 {measured}, budget {max_p50_ms:.3f} ms"

    record = {
        "action": "promotion", "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "candidate": run_dir.name, "candidate_run_dir": str(run_dir), "candidate_accuracy": candidate_accuracy,
        "candidate_p50_ms": latency, "current": current["model_id"] if current else None,
        "current_accuracy": current_accuracy, "test_rows": len(test), "min_improvement": min_improvement,
        "max_p50_ms": max_p50_ms, "promoted": promoted, "reason": reason,
    }
    if promoted:
        # The model's files are complete before current.json names it.
        model_dir = registry / "models" / run_dir.name
        for name in ("student.onnx", "metrics.json"):
            if (run_dir / name).exists():
                atomic_write(model_dir / name, lambda tmp, name=name: shutil.copyfile(run_dir / name, tmp))
        model = {
            "model_id": run_dir.name, "run_dir": str(run_dir), "onnx": f"models/{run_dir.name}/student.onnx",
            "test_accuracy": candidate_accuracy, "promoted_at": record["decided_at"],
            "previous": current["model_id"] if current else None,
        }
        atomic_write_json(model_dir / "record.json", model)
        make_current(registry, model)
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
