"""The demo: build the audio-visual digits data, write a config, run the pipeline per seed."""

from __future__ import annotations

import logging
import statistics
from importlib import resources
from pathlib import Path

import yaml

from mmkd.config import load_config
from mmkd.data.avdigits import build_avdigits
from mmkd.data.loading import load_dataset
from mmkd.reports import summary_table
from mmkd.runs import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# --quick: 40% of the pairs and short schedules, so every stage runs in under two minutes.
QUICK_PER_DIGIT = 100
QUICK_OVERRIDES = {
    "teacher": {"train": {"epochs": 10, "batch_size": 32, "patience": 4}},
    "distill": {"train": {"epochs": 20, "batch_size": 32, "patience": 8}},
    "finetune": {"train": {"epochs": 2, "batch_size": 32, "patience": 2}},
    "benchmark": {"warmup": 5, "iterations": 30},
}


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def write_demo_config(out_dir: Path, *, quick: bool) -> Path:
    """Write the packaged avdigits config to `out_dir/config.yaml`, shortened for --quick."""
    template = resources.files("mmkd").joinpath("configs/avdigits.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(template)
    if quick:
        _merge(config, QUICK_OVERRIDES)
        config["name"] = "avdigits-quick"
    path = out_dir / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(
    out_dir: Path,
    *,
    fsdd_dir: Path | None,
    mnist: Path | None,
    seeds: int = 1,
    quick: bool = False,
    download: bool = False,
    data_seed: int = 0,
) -> dict:
    """Build the data, run the pipeline once per seed and return the per-seed summary.

    Writes `out_dir/data/` (manifest, images, recordings), `out_dir/config.yaml`, one run
    folder per seed under `out_dir/runs/`, `out_dir/summary.json` and, with several
    seeds, `out_dir/compare/compare.html` with the runs side by side.
    """
    from mmkd.flows.pipeline import pipeline_flow

    out_dir = Path(out_dir)
    manifest = build_avdigits(
        out_dir / "data", fsdd_dir=fsdd_dir, mnist=mnist, seed=data_seed,
        per_digit=QUICK_PER_DIGIT if quick else None, download=download,
    )
    logger.info("Dataset manifest %s", manifest)
    config_path = write_demo_config(out_dir, quick=quick)
    load_dataset(load_config(config_path).data, cache_dir=out_dir / "runs" / "cache")

    results = []
    for seed in range(seeds):
        results.append(pipeline_flow(str(config_path), str(out_dir / "runs"), seed=seed))

    summary = {
        "seeds": list(range(seeds)),
        "run_dirs": [r["run_dir"] for r in results],
        "teacher_accuracy": [r["teacher"]["test"]["accuracy"] for r in results],
        "student_accuracy": [r["student"]["test"]["accuracy"] for r in results],
        "baseline_accuracy": [r["baseline"]["test"]["accuracy"] for r in results],
        "onnx_accuracy": [r["onnx"]["test"]["accuracy"] for r in results],
        "params": {role: results[0][role]["params"] for role in ("teacher", "student", "baseline")},
    }
    summary["mean"] = {
        key.removesuffix("_accuracy"): statistics.fmean(summary[key])
        for key in ("teacher_accuracy", "student_accuracy", "baseline_accuracy", "onnx_accuracy")
    }
    if seeds > 1:
        from mmkd.run_report import compare_runs, write_comparison

        written = write_comparison(compare_runs(summary["run_dirs"]), out_dir / "compare")
        summary["comparison"] = str(written["html"].resolve())
    atomic_write_json(out_dir / "summary.json", summary)
    summary["tables"] = [summary_table(r, r["benchmark"]) for r in results]
    return summary


def format_summary(summary: dict) -> str:
    """Return the text the demo prints: one table per seed and the means over seeds."""
    parts = []
    for seed, run_dir, table in zip(summary["seeds"], summary["run_dirs"], summary["tables"], strict=True):
        parts.append(f"seed {seed}  ({run_dir})\n{table}")
    if len(summary["seeds"]) > 1:
        mean = summary["mean"]
        parts.append(
            f"mean test accuracy over {len(summary['seeds'])} seeds: teacher {mean['teacher']:.4f}, "
            f"student {mean['student']:.4f}, baseline {mean['baseline']:.4f}, ONNX student {mean['onnx']:.4f}"
        )
    return "\n\n".join(parts)

