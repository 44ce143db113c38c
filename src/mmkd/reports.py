"""Plain-text tables of a run's metrics and benchmark, for the terminal and markdown."""

from __future__ import annotations


def benchmark_markdown(rows: list[dict]) -> str:
    """Return benchmark rows as a markdown table, with a note for providers that did not load."""
    lines = [
        "| model | engine | provider | batch | p50 ms | p90 ms | p99 ms | examples/s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = set()
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['engine']} | {row['provider']} | {row['batch_size']} | {row['p50_ms']:.3f} | "
            f"{row['p90_ms']:.3f} | {row['p99_ms']:.3f} | {row['throughput_per_s']:.0f} |"
        )
        for provider, reason in (row.get("providers_not_loaded") or {}).items():
            if provider in row.get("requested_providers", []):
                notes.add(f"- {provider} was requested but {reason}.")
    return "\n".join(lines + ([""] + sorted(notes) if notes else [])) + "\n"


def p50(rows: list[dict], model: str, engine: str, batch_size: int) -> float | None:
    """Return the p50 latency of one benchmark row, or None when it was not measured."""
    for row in rows:
        if (row["model"], row["engine"], row["batch_size"]) == (model, engine, batch_size):
            return row["p50_ms"]
    return None


def metrics_rows(metrics: dict, benchmark: list[dict]) -> list[dict]:
    """Return one row per model and engine: parameters, test accuracy, macro-F1 and batch-1 p50 latency."""
    student_params = metrics["student"]["params"]
    entries = [
        ("teacher", "PyTorch eager", metrics["teacher"]["params"], metrics["teacher"]["test"],
         p50(benchmark, "teacher", "pytorch-eager", 1)),
        ("baseline", "PyTorch eager", metrics["baseline"]["params"], metrics["baseline"]["test"], None),
        ("student", "PyTorch eager", student_params, metrics["student"]["test"],
         p50(benchmark, "student", "pytorch-eager", 1)),
        ("student", "ONNX Runtime", student_params, metrics["onnx"]["test"],
         p50(benchmark, "student", "onnxruntime", 1)),
    ]
    return [
        {"model": name, "engine": engine, "parameters": params, "test_accuracy": round(test["accuracy"], 4),
         "macro_f1": round(test["macro_f1"], 4) if "macro_f1" in test else None,
         "p50_ms_batch1": round(latency, 3) if latency is not None else None}
        for name, engine, params, test, latency in entries
    ]


def summary_table(metrics: dict, benchmark: list[dict]) -> str:
    """Return the demo's closing table: parameters, test accuracy and batch-1 latency."""
    header = f"{'model':<10}{'engine':<16}{'parameters':>12}{'test accuracy':>15}{'p50 ms, batch 1':>17}"
    lines = [header, "-" * len(header)]
    for row in metrics_rows(metrics, benchmark):
        latency = row["p50_ms_batch1"]
        latency_text = f"{latency:.3f}" if latency is not None else "-"
        lines.append(f"{row['model']:<10}{row['engine']:<16}{row['parameters']:>12,}{row['test_accuracy']:>15.4f}{latency_text:>17}")
    return "\n".join(lines)
