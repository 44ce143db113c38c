"""Benchmark flow: ONNX Runtime against PyTorch eager for teacher and student, and the student's ONNX variants."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from mmkd.benchmarking import benchmark_model, benchmark_onnx
from mmkd.checkpoints import load_checkpoint
from mmkd.flows._common import flow_logger, load_run_inputs
from mmkd.reports import benchmark_markdown, latency_plot_svg
from mmkd.runs import atomic_write_json, atomic_write_text


@flow(name="benchmark", description="Latency percentiles and throughput per engine, provider and batch size.")
def benchmark_flow(run_dir: str) -> list[dict]:
    """Write benchmark.json, benchmark.md and latency.svg (p50 against batch size) for the run's models."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)
    test = dataset.subset("test")
    settings = config.benchmark

    rows: list[dict] = []
    for role, checkpoint, onnx_path in (
        ("student", paths.student, paths.student_onnx),
        ("teacher", paths.teacher, paths.teacher_onnx),
    ):
        model, _ = load_checkpoint(checkpoint, config)
        rows += benchmark_model(
            role, model, onnx_path, test.model_inputs(),
            batch_sizes=settings.batch_sizes, providers=settings.providers, threads=settings.threads,
            warmup=settings.warmup, iterations=settings.iterations, max_seconds=settings.max_seconds,
        )

    # The student's smaller ONNX variants, on the same rows and settings.
    variants_report = paths.run_dir / "variants" / "variants.json"
    variants = json.loads(variants_report.read_text(encoding="utf-8")) if variants_report.exists() else {}
    for kind, variant in variants.items():
        if kind == "fp32" or not variant["accepted"]:
            continue
        rows += benchmark_onnx(
            f"student-{kind}", variants_report.parent / Path(variant["path"]).name, test.model_inputs(),
            batch_sizes=settings.batch_sizes, providers=settings.providers, threads=settings.threads,
            warmup=settings.warmup, iterations=settings.iterations, max_seconds=settings.max_seconds,
        )

    atomic_write_json(paths.benchmark, rows)
    atomic_write_text(paths.run_dir / "benchmark.md", benchmark_markdown(rows))
    atomic_write_text(paths.run_dir / "latency.svg", latency_plot_svg(rows))
    logger.info("Wrote %s (%d rows)", paths.benchmark, len(rows))
    return rows
