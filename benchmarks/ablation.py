"""Student accuracy for each fusion and each distillation objective, over several seeds.

Usage:
    python benchmarks/ablation.py --out runs/ablation --fsdd-dir ../shared/data/fsdd \
        --mnist ../shared/data/mnist/mnist_5k.csv.gz --seeds 3

The audio-visual digits data is built once and validated once. For each seed the
teacher is trained once, and every combination reuses it and its stored outputs: the
pipeline's own stage flows (teacher, extract, distill, finetune, evaluate) run in turn
for each combination, in a run folder of its own. Two families of combinations are run:

- fusion: each fusion plugin in the student, with the default objective (hinton + mse);
- objective: the concat student with each distillation loss or alignment term added to
  hinton, and with hinton, kl or dkd alone.

Each fusion also gets a baseline: the same student trained on labels only, with the
distillation and finetuning epochs together, as the pipeline's evaluate stage does.
The results go to ablation.json (every run's test accuracy) and ablation.md (means,
sample standard deviations over seeds, the student's size and the baseline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# Distillation epochs: fewer than the demo's 25, so that the whole ablation fits in an hour
# on a 2-core CPU. Finetuning keeps the demo's 3 epochs.
DISTILL_EPOCHS = 15

FUSIONS: dict[str, dict[str, Any]] = {
    "concat": {"name": "concat"},
    "late": {"name": "late", "params": {"dim": 32}},
    "gmu": {"name": "gmu", "params": {"dim": 32}},
    "attention": {"name": "attention", "params": {"dim": 32, "heads": 4}},
    "mult": {"name": "mult", "params": {"dim": 16, "heads": 2, "tokens": 2}},
    "tensor": {"name": "tensor", "params": {"dim": 8}},
    "lowrank": {"name": "lowrank", "params": {"dim": 16, "output_dim": 32, "rank": 4}},
    "covariance": {"name": "covariance", "params": {"dim": 8}},
}

HINTON = {"name": "hinton", "weight": 1.0, "params": {"temperature": 4.0, "alpha": 0.9}}
DEFAULT_LOSSES = [HINTON, {"name": "mse", "weight": 0.5}]

# name -> (losses, alignment terms)
OBJECTIVES: dict[str, tuple[list[dict], list[dict]]] = {
    "hinton": ([HINTON], []),
    "kl": ([{"name": "kl", "weight": 1.0}], []),
    "dkd": ([{"name": "dkd", "weight": 1.0}], []),
    "hinton+mse": (DEFAULT_LOSSES, []),
    "hinton+fitnets": ([HINTON, {"name": "fitnets", "weight": 0.5}], []),
    "hinton+cosine": ([HINTON, {"name": "cosine", "weight": 0.5}], []),
    "hinton+attention_transfer": ([HINTON, {"name": "attention_transfer", "weight": 0.5}], []),
    "hinton+similarity_preserving": ([HINTON, {"name": "similarity_preserving", "weight": 0.5}], []),
    "hinton+rkd": ([HINTON, {"name": "rkd", "weight": 0.5}], []),
    "hinton+pkt": ([HINTON, {"name": "pkt", "weight": 0.5}], []),
    "hinton+crd": ([HINTON, {"name": "crd", "weight": 0.5}], []),
    "hinton+cka": ([HINTON, {"name": "cka", "weight": 0.5}], []),
    "hinton+clip_kd": ([HINTON, {"name": "clip_kd", "weight": 0.5}], []),
    "hinton+deep_coral": ([HINTON], [{"name": "deep_coral", "weight": 0.5}]),
    "hinton+clip": ([HINTON], [{"name": "clip", "weight": 0.5}]),
}


def combinations(families: list[str]) -> list[tuple[str, str, str]]:
    """Return (family, fusion, objective) triples; the default pair appears once."""
    found: list[tuple[str, str, str]] = []
    if "fusion" in families:
        found += [("fusion", fusion, "hinton+mse") for fusion in FUSIONS]
    if "objective" in families:
        found += [("objective", "concat", objective) for objective in OBJECTIVES if objective != "hinton+mse"]
    return found


def run_config(base: dict, *, seed: int, fusion: str, objective: str, teacher: Path | None) -> dict:
    losses, alignment = OBJECTIVES[objective]
    config = json.loads(json.dumps(base))
    config.update(seed=seed, name=f"{fusion}-{objective.replace('+', '-')}")
    config["student"]["fusion"] = FUSIONS[fusion]
    config["distill"]["losses"] = losses
    config["distill"]["alignment"] = alignment
    if teacher is not None:
        config["teacher"]["checkpoint"] = str(teacher)
    return config


def start_run(runs: Path, name: str, config: dict) -> Path:
    from mmkd.config import config_from_dict, save_config

    run_dir = runs / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    save_config(config_from_dict(config, base_dir=run_dir), run_dir / "config.yaml")
    return run_dir


def summarise(records: list[dict]) -> str:
    """Return the markdown table of mean and standard deviation over seeds per combination."""
    lines = [
        "| family | fusion | objective | student params | student test accuracy | baseline test accuracy | seeds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["family"], record["fusion"], record["objective"]), []).append(record)

    def spread(values: list[float]) -> str:
        deviation = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {deviation:.4f}"

    for (family, fusion, objective), group in groups.items():
        student = [r["student_accuracy"] for r in group]
        baseline = [r["baseline_accuracy"] for r in group]
        lines.append(
            f"| {family} | {fusion} | {objective} | {group[0]['student_params']:,} | {spread(student)} | "
            f"{spread(baseline)} | {len(group)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--fsdd-dir", type=Path, required=True, help="FSDD recordings folder.")
    parser.add_argument("--mnist", type=Path, required=True, help="The MNIST CSV.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per combination (default 3).")
    parser.add_argument("--families", nargs="+", choices=["fusion", "objective"], default=["fusion", "objective"])
    parser.add_argument("--per-digit", type=int, default=None, help="Use N recordings per digit (smoke runs).")
    parser.add_argument("--epochs", type=int, default=DISTILL_EPOCHS, help="Distillation epochs.")
    args = parser.parse_args(argv)

    import mmkd  # noqa: F401  (offline defaults before Prefect is imported)
    from mmkd.data.avdigits import build_avdigits
    from mmkd.demo import write_demo_config
    from mmkd.flows.distill import distill_flow
    from mmkd.flows.evaluate import evaluate_flow
    from mmkd.flows.extract import extract_flow
    from mmkd.flows.finetune import finetune_flow
    from mmkd.flows.teacher import teacher_flow
    from mmkd.flows.validate import validate_flow

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    build_avdigits(args.out / "data", fsdd_dir=args.fsdd_dir, mnist=args.mnist, per_digit=args.per_digit)
    base = yaml.safe_load(write_demo_config(args.out, quick=False).read_text(encoding="utf-8"))
    base["device"] = "cpu"
    base["data"]["manifest"] = str((args.out / "data" / "manifest.csv").resolve())
    base["distill"]["train"]["epochs"] = args.epochs
    if args.per_digit is not None:
        # Too few rows for a row of every class in every split.
        base.setdefault("validation", {})["min_rows_per_class_per_split"] = 0
    runs = args.out / "runs"

    records: list[dict] = []
    for seed in range(args.seeds):
        teacher_run = start_run(runs, f"seed{seed}-teacher", run_config(base, seed=seed, fusion="concat", objective="hinton+mse", teacher=None))
        if seed == 0:
            validation = validate_flow.fn(str(teacher_run))
            print(f"validation: {validation['rows_kept']} of {validation['rows_in']} rows kept", flush=True)
        teacher_flow.fn(str(teacher_run))
        extract_flow.fn(str(teacher_run))
        baselines: dict[str, Path] = {}
        for family, fusion, objective in combinations(args.families):
            config = run_config(base, seed=seed, fusion=fusion, objective=objective, teacher=teacher_run / "teacher.pt")
            run_dir = start_run(runs, f"seed{seed}-{fusion}-{objective.replace('+', '-')}", config)
            teacher_flow.fn(str(run_dir))
            extract_flow.fn(str(run_dir))
            distill_flow.fn(str(run_dir))
            finetune_flow.fn(str(run_dir))
            # The baseline depends on the fusion and the seed only, so it is trained once for each.
            if fusion in baselines:
                shutil.copyfile(baselines[fusion], run_dir / "baseline.pt")
            evaluation = evaluate_flow.fn(str(run_dir))
            baselines.setdefault(fusion, run_dir / "baseline.pt")
            record = {
                "family": family, "fusion": fusion, "objective": objective, "seed": seed,
                "student_params": evaluation["student"]["params"],
                "student_accuracy": evaluation["student"]["test"]["accuracy"],
                "baseline_accuracy": evaluation["baseline"]["test"]["accuracy"],
                "teacher_accuracy": evaluation["teacher"]["test"]["accuracy"],
                "run_dir": str(run_dir),
            }
            records.append(record)
            print(f"seed {seed} {fusion} {objective}: student {record['student_accuracy']:.4f}, "
                  f"baseline {record['baseline_accuracy']:.4f}, {time.perf_counter() - started:.0f} s", flush=True)

    elapsed = time.perf_counter() - started
    (args.out / "ablation.json").write_text(
        json.dumps({"seconds": elapsed, "distill_epochs": args.epochs, "records": records}, indent=2), encoding="utf-8"
    )
    table = summarise(records)
    (args.out / "ablation.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"Ablation finished in {elapsed / 60:.1f} min; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
