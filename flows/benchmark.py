"""Benchmark flow: ONNX Runtime against PyTorch eager for teacher and student, and the student's ONNX variants."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from prefect import flow

from mmkd.benchmarking import benchmark_model, benchmark_onnx
from mmkd.checkpoints import load_checkpoint
from mmkd.data.loading import TensorDataset
from mmkd.flows._common import flow_logger, load_run_inputs
from mmkd.reports import benchmark_markdown, latency_plot_svg
from mmkd.runs import atomic_write_json, atomic_write_text


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Cut `x` to `length` along its second axis, or pad it there with zeros."""
    return x[:, :length] if x.shape[1] >= length else torch.nn.functional.pad(x, (0, length - x.shape[1]))


def _with_length(data: TensorDataset, length: tuple[str, int] | None) -> tuple[torch.Tensor, ...]:
    """Return the rows' model inputs with recordings (("audio", samples)) or texts (("text", tokens)) cut or padded.

    Padded tokens are masked out by a zero attention mask. None, or a modality the rows
    lack, keeps the inputs as they are.
    """
    if length is None or length[0] not in data.modalities:
        return data.model_inputs()
    modality, size = length
    names = ["audio"] if modality == "audio" else ["input_ids", "attention_mask"]
    return replace(data, inputs={**data.inputs, **{n: _fit_length(data.inputs[n], size) for n in names}}).model_inputs()


@flow(name="benchmark", description="Latency percentiles and throughput per engine, provider and batch size.")
def benchmark_flow(run_dir: str) -> list[dict]:
    """Write benchmark.json, benchmark.md and latency.svg (p50 against batch size) for the run's models."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)
    test = dataset.subset("test")
    settings = config.benchmark

    # The student's smaller ONNX variants are timed beside the float32 models.
    variants_report = paths.run_dir / "variants" / "variants.json"
    variants = json.loads(variants_report.read_text(encoding="utf-8")) if variants_report.exists() else {}
    accepted = [(kind, variants_report.parent / Path(v["path"]).name) for kind, v in variants.items()
                if kind != "fp32" and v["accepted"]]
    models = {role: load_checkpoint(checkpoint, config)[0]
              for role, checkpoint in (("student", paths.student), ("teacher", paths.teacher))}
    timing = {"batch_sizes": settings.batch_sizes, "providers": settings.providers, "threads": settings.threads,
              "warmup": settings.warmup, "iterations": settings.iterations, "max_seconds": settings.max_seconds,
              "io_binding": settings.io_binding}

    rows: list[dict] = []
    lengths: list[tuple[str, int] | None] = [None]
    lengths += [("audio", round(s * config.data.audio.sample_rate_hz)) for s in settings.audio_seconds]
    lengths += [("text", tokens) for tokens in settings.text_tokens]
    for length in lengths:
        # Each model reads its own modalities; the student may read fewer than the teacher.
        inputs = {role: _with_length(test.with_modalities(model.modalities), length) for role, model in models.items()}
        for role, onnx_path in (("student", paths.student_onnx), ("teacher", paths.teacher_onnx)):
            rows += benchmark_model(role, models[role], onnx_path, inputs[role], torch_compile=settings.torch_compile,
                                    **timing)
        for kind, path in accepted:
            rows += benchmark_onnx(f"student-{kind}", path, inputs["student"], **timing)

    atomic_write_json(paths.benchmark, rows)
    atomic_write_text(paths.run_dir / "benchmark.md", benchmark_markdown(rows))
    atomic_write_text(paths.run_dir / "latency.svg", latency_plot_svg(rows))
    logger.info("Wrote %s (%d rows)", paths.benchmark, len(rows))
    return rows
