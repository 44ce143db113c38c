"""Plain-text tables of a run's metrics and benchmark, for the terminal and markdown."""

from __future__ import annotations


def benchmark_markdown(rows: list[dict]) -> str:
    """Return benchmark rows as a markdown table, with a note for providers that did not load."""
    lines = [
        "| model | engine | provider | batch | audio samples | tokens | p50 ms | p90 ms | p99 ms | examples/s | peak MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = set()
    for row in rows:
        provider = f"{row['provider']} (IO binding)" if row.get("io_binding") else row["provider"]
        lines.append(
            f"| {row['model']} | {row['engine']} | {provider} | {row['batch_size']} | "
            f"{row.get('audio_samples') or '-'} | {row.get('tokens') or '-'} | {row['p50_ms']:.3f} | "
            f"{row['p90_ms']:.3f} | {row['p99_ms']:.3f} | {row['throughput_per_s']:.0f} | "
            f"{'-' if row.get('peak_mib') is None else format(row['peak_mib'], '.1f')} |"
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


# Plot area of the latency chart, in SVG user units.
PLOT_WIDTH, PLOT_HEIGHT, MARGIN_LEFT, MARGIN_TOP = 520, 320, 70, 30
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def latency_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Group benchmark rows into (batch size, p50 ms) lines, one per model and engine.

    When the rows were timed at several recording or text lengths, each length is a line of its own.
    """
    lengths = {row.get("audio_samples") for row in rows}
    token_lengths = {row.get("tokens") for row in rows}
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        name = f"{row['model']} / {row['engine']}"
        if len(lengths) > 1:
            name += f" / {row.get('audio_samples')} samples"
        if len(token_lengths) > 1:
            name += f" / {row.get('tokens')} tokens"
        series.setdefault(name, []).append((row["batch_size"], row["p50_ms"]))
    return series


def latency_plot_svg(rows: list[dict]) -> str:
    """Return an SVG line chart of p50 latency against batch size, one line per model and engine.

    Both axes are logarithmic, so equal steps mean equal ratios. Written by hand to keep
    plotting free of dependencies; each line is a <polyline> whose `data-series` names it.
    """
    import math

    series = latency_series(rows)
    batches = sorted({b for points in series.values() for b, _ in points})
    latencies = [ms for points in series.values() for _, ms in points]
    x_low, x_high = math.log2(batches[0]), math.log2(batches[-1])
    y_low, y_high = math.floor(math.log10(min(latencies))), math.ceil(math.log10(max(latencies)))
    y_high = max(y_high, y_low + 1)

    def x_of(batch: int) -> float:
        span = (x_high - x_low) or 1.0
        return MARGIN_LEFT + PLOT_WIDTH * (math.log2(batch) - x_low) / span

    def y_of(ms: float) -> float:
        return MARGIN_TOP + PLOT_HEIGHT * (1 - (math.log10(ms) - y_low) / (y_high - y_low))

    width, height = MARGIN_LEFT + PLOT_WIDTH + 230, MARGIN_TOP + PLOT_HEIGHT + 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" fill="none" stroke="#888"/>']
    for batch in batches:
        parts.append(f'<text x="{x_of(batch):.1f}" y="{MARGIN_TOP + PLOT_HEIGHT + 18}" text-anchor="middle">{batch}</text>')
    for power in range(y_low, y_high + 1):
        y = y_of(10.0**power)
        parts.append(f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + PLOT_WIDTH}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{MARGIN_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{10.0**power:g}</text>')
    parts.append(f'<text x="{MARGIN_LEFT + PLOT_WIDTH / 2}" y="{height - 12}" text-anchor="middle">batch size</text>')
    parts.append(f'<text x="16" y="{MARGIN_TOP + PLOT_HEIGHT / 2}" transform="rotate(-90 16 {MARGIN_TOP + PLOT_HEIGHT / 2})" '
                 'text-anchor="middle">p50 latency, ms</text>')
    for index, (name, points) in enumerate(sorted(series.items())):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        coordinates = " ".join(f"{x_of(b):.1f},{y_of(ms):.1f}" for b, ms in sorted(points))
        parts.append(f'<polyline data-series="{name}" points="{coordinates}" fill="none" stroke="{colour}" stroke-width="2"/>')
        legend_y = MARGIN_TOP + 14 + 18 * index
        parts.append(f'<line x1="{MARGIN_LEFT + PLOT_WIDTH + 16}" x2="{MARGIN_LEFT + PLOT_WIDTH + 36}" '
                     f'y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{MARGIN_LEFT + PLOT_WIDTH + 42}" y="{legend_y}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
