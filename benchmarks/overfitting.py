"""Effect of each control against overfitting on the audio-visual digits student, over several seeds.

Usage:
    python benchmarks/overfitting.py --out runs/overfitting --fsdd-dir ../shared/data/fsdd \
        --mnist ../shared/data/mnist/mnist_5k.csv.gz --seeds 3

The data is the quick demo's (100 recordings per digit, 1,000 rows) with the quick
demo's schedules. For each seed the teacher is trained once, without any of the
controls, and every control reuses it and its stored outputs, so that only the student's
training differs. Each control is applied to the distilled student (distillation and
finetuning) and to its label-only baseline alike. The results go to overfitting.json
(every run's test accuracy) and overfitting.md (means and sample standard deviations).
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

STAGES = ("distill", "finetune")

# control -> (description, change to the base config)
CONTROLS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("the quick demo's settings", {}),
    "augmentation": (
        "images: rotation up to 10°, shift up to 10%, 2-pixel crop; audio: 2 frequency and 2 time masks, "
        "±6 dB gain, noise at 30 dB SNR",
        {"augment": {"image": {"degrees": 10, "translate": 0.1, "crop_padding": 2},
                     "audio": {"freq_masks": 2, "freq_mask_bins": 6, "time_masks": 2, "time_mask_frames": 6,
                               "gain_db": 6, "noise_snr_db": 30}}},
    ),
    "label smoothing": ("0.1 on the label loss of finetuning and the baseline", {"train": {"label_smoothing": 0.1}}),
    "weight decay": ("AdamW weight decay 0.05 (default 1e-4)", {"train": {"weight_decay": 0.05}}),
    "dropout": ("0.3 before the student's head (default 0.1)", {"student": {"dropout": 0.3}}),
    "adversarial": (
        "PGD, 3 steps, image epsilon 0.1, audio epsilon 0.002; loss averaged over rows and their copies",
        {"train": {"adversarial": {"method": "pgd", "steps": 3, "image_epsilon": 0.1, "audio_epsilon": 0.002}}},
    ),
    "weight average": ("EMA of the weights, decay 0.99", {"train": {"ema_decay": 0.99}}),
    "early stopping on loss": ("best epoch and patience on validation loss", {"train": {"monitor": "val_loss"}}),
}


def control_config(base: dict, control: str, *, seed: int, teacher: Path | None) -> dict:
    """Return the base config with `control` applied to the student's stages, for one seed."""
    config = json.loads(json.dumps(base))
    config.update(seed=seed, name=control.replace(" ", "-"))
    change = CONTROLS[control][1]
    for stage in STAGES:
        config[stage]["train"].update(change.get("train", {}))
    config["student"].update(change.get("student", {}))
    if "augment" in change:
        config["augment"] = change["augment"]
        config["teacher"]["train"]["augment"] = False
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
    """Return the markdown table: mean ± sample standard deviation over seeds per control."""
    lines = [
        "| control | setting | student test accuracy | baseline test accuracy | student epochs (distill + finetune) | seeds |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def spread(values: list[float]) -> str:
        deviation = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {deviation:.4f}"

    for control, (description, _) in CONTROLS.items():
        group = [r for r in records if r["control"] == control]
        if not group:
            continue
        epochs = statistics.mean(r["student_epochs"] for r in group)
        lines.append(f"| {control} | {description} | {spread([r['student_accuracy'] for r in group])} | "
                     f"{spread([r['baseline_accuracy'] for r in group])} | {epochs:.1f} | {len(group)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--fsdd-dir", type=Path, required=True, help="FSDD recordings folder.")
    parser.add_argument("--mnist", type=Path, required=True, help="The MNIST CSV.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per control (default 3).")
    parser.add_argument("--controls", nargs="+", choices=list(CONTROLS), default=list(CONTROLS))
    args = parser.parse_args(argv)

    import mmkd  # noqa: F401  (offline defaults before Prefect is imported)
    from mmkd.data.avdigits import build_avdigits
    from mmkd.demo import QUICK_PER_DIGIT, write_demo_config
    from mmkd.flows.distill import distill_flow
    from mmkd.flows.evaluate import evaluate_flow
    from mmkd.flows.extract import extract_flow
    from mmkd.flows.finetune import finetune_flow
    from mmkd.flows.teacher import teacher_flow
    from mmkd.flows.validate import validate_flow

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    build_avdigits(args.out / "data", fsdd_dir=args.fsdd_dir, mnist=args.mnist, per_digit=QUICK_PER_DIGIT)
    base = yaml.safe_load(write_demo_config(args.out, quick=True).read_text(encoding="utf-8"))
    base["device"] = "cpu"
    base["data"]["manifest"] = str((args.out / "data" / "manifest.csv").resolve())
    runs = args.out / "runs"

    records: list[dict] = []
    for seed in range(args.seeds):
        teacher_run = start_run(runs, f"seed{seed}-teacher", control_config(base, "none", seed=seed, teacher=None))
        if seed == 0:
            validation = validate_flow.fn(str(teacher_run))
            print(f"validation: {validation['rows_kept']} of {validation['rows_in']} rows kept", flush=True)
        teacher_flow.fn(str(teacher_run))
        for control in args.controls:
            config = control_config(base, control, seed=seed, teacher=teacher_run / "teacher.pt")
            run_dir = start_run(runs, f"seed{seed}-{control.replace(' ', '-')}", config)
            teacher_flow.fn(str(run_dir))
            extract_flow.fn(str(run_dir))
            distill_flow.fn(str(run_dir))
            finetune_flow.fn(str(run_dir))
            evaluation = evaluate_flow.fn(str(run_dir))
            training = evaluation["student"]["training"]
            record = {
                "control": control, "seed": seed,
                "student_accuracy": evaluation["student"]["test"]["accuracy"],
                "baseline_accuracy": evaluation["baseline"]["test"]["accuracy"],
                "teacher_accuracy": evaluation["teacher"]["test"]["accuracy"],
                "student_epochs": training["distill"]["epochs_run"] + training["finetune"]["epochs_run"],
                "run_dir": str(run_dir),
            }
            records.append(record)
            print(f"seed {seed} {control}: student {record['student_accuracy']:.4f}, "
                  f"baseline {record['baseline_accuracy']:.4f}, {time.perf_counter() - started:.0f} s", flush=True)

    elapsed = time.perf_counter() - started
    (args.out / "overfitting.json").write_text(json.dumps({"seconds": elapsed, "records": records}, indent=2),
                                               encoding="utf-8")
    table = summarise(records)
    (args.out / "overfitting.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"Finished in {elapsed / 60:.1f} min; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
