"""The same Hinton distillation run by mmkd and by torchdistill: test accuracy over seeds, and wall time.

Usage:
    python -m venv .venv-torchdistill
    .venv-torchdistill/bin/pip install torch==2.14.1 torchvision==0.29.1 -e . torchdistill
    .venv/bin/python benchmarks/torchdistill_compare.py --out runs/torchdistill \
        --fsdd-dir ../shared/data/fsdd --mnist ../shared/data/mnist/mnist_5k.csv.gz \
        --torchdistill-python .venv-torchdistill/bin/python --seeds 3

For each seed the quick demo's teacher is trained once by mmkd (audio-visual digits,
1,000 rows). Then the demo's student is distilled from it twice. Both runs use the Hinton
loss alone (temperature 4, 0.9 on the soft targets), AdamW and the same one-cycle
schedule, batch size, epochs (no early stopping) and initial weights. Both keep the
weights of the best validation epoch:

- by mmkd: the extract stage stores the teacher's outputs, the distill stage trains
  against them;
- by torchdistill, installed from PyPI in its own environment (`--torchdistill-python`):
  its DistillationBox runs the teacher on every batch in the student's loop, as its KD
  recipes do.

Both read the same decoded rows. mmkd's time counts extraction and distillation;
torchdistill's counts its training loop. Results go to torchdistill.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HINTON = {"name": "hinton", "weight": 1.0, "params": {"temperature": 4.0, "alpha": 0.9}}


def prepare_runs(args) -> list[Path]:
    """Build the data and train one teacher per seed with mmkd; return the run folders."""
    import yaml

    from mmkd.config import config_from_dict, save_config
    from mmkd.data.avdigits import build_avdigits
    from mmkd.demo import QUICK_PER_DIGIT, write_demo_config
    from mmkd.flows.teacher import teacher_flow
    from mmkd.flows.validate import validate_flow

    build_avdigits(args.out / "data", fsdd_dir=args.fsdd_dir, mnist=args.mnist, per_digit=QUICK_PER_DIGIT)
    base = yaml.safe_load(write_demo_config(args.out, quick=True).read_text(encoding="utf-8"))
    base["device"] = "cpu"
    base["data"]["manifest"] = str((args.out / "data" / "manifest.csv").resolve())
    base["distill"]["losses"] = [HINTON]
    base["distill"]["alignment"] = []
    base["distill"]["train"].update(epochs=args.epochs, patience=args.epochs)
    runs = []
    for seed in range(args.seeds):
        run_dir = args.out / "runs" / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config_from_dict({**base, "seed": seed, "name": f"seed{seed}"}, base_dir=run_dir),
                    run_dir / "config.yaml")
        if seed == 0:
            validate_flow.fn(str(run_dir))
        else:
            # The clean manifest of the first seed's validation: the same rows for every seed.
            first = yaml.safe_load((runs[0] / "config.yaml").read_text(encoding="utf-8"))
            config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
            config["data"]["manifest"], config["data"]["root"] = first["data"]["manifest"], first["data"]["root"]
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if not (run_dir / "teacher.pt").exists():
            teacher_flow.fn(str(run_dir))
        runs.append(run_dir)
    return runs


def run_mmkd(run_dir: Path) -> dict:
    from mmkd.checkpoints import load_checkpoint
    from mmkd.config import load_config
    from mmkd.flows.distill import distill_flow
    from mmkd.flows.extract import extract_flow

    started = time.perf_counter()
    extract_flow.fn(str(run_dir))
    extracted = time.perf_counter()
    distill_flow.fn(str(run_dir))
    finished = time.perf_counter()
    config = load_config(run_dir / "config.yaml")
    student, metadata = load_checkpoint(run_dir / "student_distilled.pt", config)
    return {"test_accuracy": test_accuracy(student, run_dir), "extract_s": extracted - started,
            "distill_s": finished - extracted, "wall_s": finished - started,
            "best_epoch": metadata["training"]["best_epoch"]}


def decoded_rows(run_dir: Path):
    from mmkd.config import load_config
    from mmkd.data.loading import decode_to_cache, load_decoded

    config = load_config(run_dir / "config.yaml")
    return config, load_decoded(decode_to_cache(config.data, run_dir.parent / "cache"))


def test_accuracy(model, run_dir: Path) -> float:
    from mmkd.training import predict

    _, dataset = decoded_rows(run_dir)
    test = dataset.subset("test")
    return float((predict(model, test)[0].argmax(1) == test.labels).float().mean())


def run_torchdistill(run_dir: Path) -> dict:
    """Distil the student with torchdistill's DistillationBox; runs in torchdistill's environment."""
    import torch
    from torch.utils.data import Dataset, RandomSampler
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.interfaces.registry import register_forward_proc_func

    from mmkd.checkpoints import build_model, load_checkpoint
    from mmkd.flows.distill import STUDENT_SEED_OFFSET
    from mmkd.training import predict

    @register_forward_proc_func
    def forward_mmkd_logits(model, sample_batch, targets=None, supp_dict=None, **kwargs):
        return model(*sample_batch)[0]

    class Rows(Dataset):
        def __init__(self, data):
            self.inputs, self.labels = data.model_inputs(), data.labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, index):
            return tuple(x[index] for x in self.inputs), self.labels[index]

    config, dataset = decoded_rows(run_dir)
    train, val = dataset.subset("train"), dataset.subset("val")
    teacher, _ = load_checkpoint(run_dir / "teacher.pt", config)
    torch.manual_seed(config.seed + STUDENT_SEED_OFFSET)
    student = build_model(config, "student", dataset.classes)
    schedule = config.distill.train
    steps = config.distill.train.epochs * -(-len(train) // schedule.batch_size)
    generator = torch.Generator().manual_seed(config.seed + 1)
    model_settings = {"forward_proc": "forward_mmkd_logits"}
    train_config = {
        "num_epochs": schedule.epochs,
        "train_data_loader": {"dataset_id": "train", "requires_supp": True,
                              "sampler": {"class_or_func": RandomSampler, "kwargs": {"generator": generator}},
                              "kwargs": {"batch_size": schedule.batch_size, "num_workers": 0}},
        "teacher": {**model_settings, "requires_grad": False},
        "student": {**model_settings, "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": schedule.lr, "weight_decay": schedule.weight_decay}},
        "scheduler": {"key": "OneCycleLR", "scheduling_step": 1,
                      "kwargs": {"max_lr": schedule.lr, "total_steps": steps,
                                 "pct_start": min(0.5, max(0.2, 2.5 / steps))}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"weight": 1.0, "criterion": {
            "key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                        "teacher_module_path": ".", "teacher_module_io": "output",
                                        "temperature": HINTON["params"]["temperature"],
                                        "alpha": 1 - HINTON["params"]["alpha"]}}}}}},
    }
    device = torch.device("cpu")
    started = time.perf_counter()
    box = get_distillation_box(teacher, student, {"train": Rows(train)}, train_config, device, None, False, 1)
    box.teacher_model.eval()
    best, best_accuracy, best_epoch = None, -1.0, 0
    for epoch in range(schedule.epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        box.post_epoch_process()
        accuracy = float((predict(student, val)[0].argmax(1) == val.labels).float().mean())
        if accuracy > best_accuracy:
            best, best_accuracy, best_epoch = copy.deepcopy(student.state_dict()), accuracy, epoch + 1
    wall = time.perf_counter() - started
    student.load_state_dict(best)
    return {"test_accuracy": test_accuracy(student.eval(), run_dir), "wall_s": wall, "best_epoch": best_epoch}


def spread(values: list[float]) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {deviation:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--fsdd-dir", type=Path, help="FSDD recordings folder.")
    parser.add_argument("--mnist", type=Path, help="The MNIST CSV.")
    parser.add_argument("--torchdistill-python", type=Path, help="Python of the environment with torchdistill.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds (default 3).")
    parser.add_argument("--epochs", type=int, default=20, help="Distillation epochs (default: the quick demo's 20).")
    parser.add_argument("--torchdistill-run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import mmkd  # noqa: F401  (offline defaults)

    if args.torchdistill_run is not None:
        print(json.dumps(run_torchdistill(args.torchdistill_run)))
        return 0

    args.out = args.out.resolve()
    records = []
    for run_dir in prepare_runs(args):
        mmkd_result = run_mmkd(run_dir)
        completed = subprocess.run(
            [str(args.torchdistill_python), str(Path(__file__).resolve()), "--out", str(args.out),
             "--torchdistill-run", str(run_dir)],
            capture_output=True, text=True, check=True,
        )
        torchdistill_result = json.loads(completed.stdout.strip().splitlines()[-1])
        records.append({"run_dir": str(run_dir), "mmkd": mmkd_result, "torchdistill": torchdistill_result})
        print(f"{run_dir.name}: mmkd {mmkd_result['test_accuracy']:.4f} in {mmkd_result['wall_s']:.1f} s, "
              f"torchdistill {torchdistill_result['test_accuracy']:.4f} in {torchdistill_result['wall_s']:.1f} s",
              flush=True)

    mmkd_wall = statistics.median(r["mmkd"]["wall_s"] for r in records)
    torchdistill_wall = statistics.median(r["torchdistill"]["wall_s"] for r in records)
    summary = {
        "records": records, "epochs": args.epochs,
        "mmkd_test_accuracy": spread([r["mmkd"]["test_accuracy"] for r in records]),
        "torchdistill_test_accuracy": spread([r["torchdistill"]["test_accuracy"] for r in records]),
        "mmkd_wall_s_median": mmkd_wall, "torchdistill_wall_s_median": torchdistill_wall,
        "wall_ratio": mmkd_wall / torchdistill_wall,
    }
    (args.out / "torchdistill.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = (
        "| tool | test accuracy (mean ± sd) | wall time, median (s) |\n| --- | ---: | ---: |\n"
        f"| mmkd (extract + distill) | {summary['mmkd_test_accuracy']} | {mmkd_wall:.1f} |\n"
        f"| torchdistill (teacher in the loop) | {summary['torchdistill_test_accuracy']} | {torchdistill_wall:.1f} |\n"
    )
    (args.out / "torchdistill.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"mmkd / torchdistill wall time: {summary['wall_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
