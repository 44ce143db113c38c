"""Costs of the feature store, each as a ratio measured in the same run.

Usage:
    python benchmarks/feature_store.py [--small 5000] [--large 50000] [--rows 2500] [--repeats 3]

1. Memory: extracting the outputs of `--small` and of `--large` generated rows, each in
   a fresh process, with the demo's teacher architecture. Rows are generated a batch at
   a time, as a streaming reader would deliver them. Prints the peak resident memory of
   each and their ratio, and the rise over the process's memory before extracting.
2. Distillation epoch: one epoch of the demo's student trained on the distillation
   objective (Hinton and feature MSE, teacher outputs read from the store, the read
   included) against one epoch of the same student on labels alone, on `--rows` rows.
   The median of `--repeats` alternating runs of each.
3. Re-extraction: opening the store and extracting `--rows` rows a second time, when
   every row is stored, against the first extraction into an empty store.

The teacher and student have random weights: their cost does not depend on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = 10_800  # 1.35 s at 8 kHz, the demo's recording length


def row_key(i: int) -> str:
    return hashlib.sha256(f"generated row {i}".encode()).hexdigest()[:24]


def demo_config():
    """Return the packaged audio-visual digits config, with a placeholder manifest path."""
    import yaml

    from mmkd.config import config_from_dict

    raw = yaml.safe_load((Path(__file__).parents[1] / "src" / "mmkd" / "configs" / "avdigits.yaml").read_text())
    raw["data"]["manifest"] = "generated.csv"
    raw["device"] = "cpu"
    return config_from_dict(raw, base_dir=Path(tempfile.gettempdir()))


def generated_inputs(positions: list[int]):
    """Images and recordings for rows `positions`, the same for the same positions."""
    import torch

    generator = torch.Generator().manual_seed(positions[0])
    images = torch.randn(len(positions), 1, 28, 28, generator=generator)
    audio = torch.randn(len(positions), SAMPLES, generator=generator) * 0.1
    return images, audio, torch.ones(len(positions), 2, dtype=torch.bool)


def teacher_runner(config):
    """Return run_teacher(positions) for `extract`, using the demo's teacher architecture."""
    import torch

    from mmkd.checkpoints import build_model

    torch.manual_seed(0)
    teacher = build_model(config, "teacher", config.data.classes).eval()

    @torch.no_grad()
    def run_teacher(positions: list[int]) -> dict:
        logits, embeddings, modality_embeddings = teacher.forward_with_modalities(*generated_inputs(positions))
        return {"logits": logits, "embeddings": embeddings, "modality_embeddings": modality_embeddings}

    return run_teacher


def resident_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_worker(rows: int, folder: str) -> None:
    """Extract `rows` generated rows into a fresh store and print the process's memory as JSON."""
    import torch

    from mmkd.features import FeatureStore, extract

    torch.set_num_threads(2)
    config = demo_config()
    run_teacher = teacher_runner(config)
    run_teacher([0, 1])  # let the allocator settle before measuring the baseline
    keys = [row_key(i) for i in range(rows)]
    before = resident_mib("VmRSS")
    started = time.perf_counter()
    computed = extract(FeatureStore(Path(folder), "teacher"), run_teacher, keys,
                       shard_rows=config.extract.shard_rows, batch_rows=config.extract.batch_size)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": computed, "seconds": seconds, "before_mib": before, "peak_mib": resident_mib("VmHWM")}))


def measure_memory(rows: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        output = subprocess.run([sys.executable, __file__, "--worker", str(rows), folder],
                                capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def epoch_ratio(rows: int, repeats: int) -> dict:
    """Median seconds of one distillation epoch and one supervised epoch of the demo's student."""
    import torch

    from mmkd.checkpoints import build_model
    from mmkd.config import TrainConfig
    from mmkd.data.loading import TensorDataset
    from mmkd.distillation import DistillationObjective
    from mmkd.features import FeatureStore, extract
    from mmkd.training import Runtime, cross_entropy_loss, fit

    torch.set_num_threads(2)
    config = demo_config()
    keys = [row_key(i) for i in range(rows)]
    images, audio, mask = generated_inputs(list(range(rows)))
    labels = torch.arange(rows) % 10
    data = TensorDataset(inputs={"image": images, "audio": audio}, mask=mask, labels=labels,
                         ids=[str(i) for i in range(rows)], splits=["train"] * rows, keys=keys,
                         classes=config.data.classes, modalities=["image", "audio"])
    val = data.take(list(range(64)))
    one_epoch = TrainConfig(**{**config.distill.train.model_dump(), "epochs": 1})

    with tempfile.TemporaryDirectory() as folder:
        extract(FeatureStore(Path(folder), "teacher"), teacher_runner(config), keys)
        times: dict[str, list[float]] = {"distill": [], "supervised": []}
        # An untimed first epoch, so that neither kind pays for the process's first-call costs.
        fit(build_model(config, "student", config.data.classes), data, val, one_epoch, cross_entropy_loss,
            stage="warm-up", seed=0, runtime=Runtime())
        for _ in range(repeats):
            for kind in ("supervised", "distill"):
                torch.manual_seed(0)
                student = build_model(config, "student", config.data.classes)
                started = time.perf_counter()
                if kind == "distill":
                    logits, embeddings = FeatureStore(Path(folder), "teacher").get(keys)
                    objective = DistillationObjective(
                        config.distill.losses, student_dim=student.embedding_dim, teacher_dim=embeddings.shape[1],
                        teacher_logits=logits, teacher_embeddings=embeddings,
                    )
                    fit(student, data, val, one_epoch, objective, stage="distill", seed=0,
                        runtime=Runtime(), extra_modules=[objective])
                else:
                    fit(student, data, val, one_epoch, cross_entropy_loss, stage="supervised", seed=0,
                        runtime=Runtime())
                times[kind].append(time.perf_counter() - started)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    return {"rows": rows, "distill_s": medians["distill"], "supervised_s": medians["supervised"],
            "ratio": medians["distill"] / medians["supervised"], "all_s": times}


def reextraction_ratio(rows: int) -> dict:
    import torch

    from mmkd.features import FeatureStore, extract

    torch.set_num_threads(2)
    config = demo_config()
    run_teacher = teacher_runner(config)
    keys = [row_key(i) for i in range(rows)]
    with tempfile.TemporaryDirectory() as folder:
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            extract(FeatureStore(Path(folder), "teacher"), run_teacher, keys)
            seconds.append(time.perf_counter() - started)
    return {"rows": rows, "first_s": seconds[0], "again_s": seconds[1], "ratio": seconds[1] / seconds[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=5000, help="Rows of the smaller extraction.")
    parser.add_argument("--large", type=int, default=50000, help="Rows of the larger extraction.")
    parser.add_argument("--rows", type=int, default=2500, help="Rows of the epoch and re-extraction measurements.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each epoch kind.")
    parser.add_argument("--worker", nargs=2, metavar=("ROWS", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(int(args.worker[0]), args.worker[1])
        return 0

    small, large = measure_memory(args.small), measure_memory(args.large)
    memory = {"small": small, "large": large, "peak_ratio": large["peak_mib"] / small["peak_mib"]}
    print(f"memory: {small['rows']} rows peak {small['peak_mib']:.1f} MiB ({small['peak_mib'] - small['before_mib']:.1f} "
          f"above the start, {small['seconds']:.1f} s); {large['rows']} rows peak {large['peak_mib']:.1f} MiB "
          f"({large['peak_mib'] - large['before_mib']:.1f} above, {large['seconds']:.1f} s); ratio {memory['peak_ratio']:.3f}")
    epoch = epoch_ratio(args.rows, args.repeats)
    print(f"epoch: distillation {epoch['distill_s']:.2f} s, supervised {epoch['supervised_s']:.2f} s; "
          f"ratio {epoch['ratio']:.3f}")
    again = reextraction_ratio(args.rows)
    print(f"re-extraction: first {again['first_s']:.2f} s, again {again['again_s']:.4f} s; ratio {again['ratio']:.4f}")
    print(json.dumps({"memory": memory, "epoch": epoch, "reextraction": again}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
