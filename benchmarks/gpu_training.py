"""Training throughput on a GPU with and without mixed precision, and how busy the GPU was.

Usage (on a machine with a CUDA GPU; at most a few minutes):
    python benchmarks/gpu_training.py --rows 20000 --out gpu_training.json

For each precision (fp32, bf16 where supported, fp16 with a gradient scaler) it trains
the demo's audio-visual teacher and student architectures through `mmkd.training.fit` on
generated rows of the audio-visual digits' shapes, for one epoch, after an untimed warm-up
epoch. It reports rows per second and the GPU's busy fraction over the timed epoch,
sampled by `nvidia-smi` every 100 ms, and the speed-up of each precision over fp32.
Without a GPU it prints that and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class BusySampler:
    """Samples the GPU's utilisation with nvidia-smi in a thread while training runs."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.samples, self.stop = interval_s, [], threading.Event()

    def __enter__(self):
        def sample():
            while not self.stop.is_set():
                result = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"],
                    capture_output=True, text=True, check=False,
                )
                if result.returncode == 0 and result.stdout.strip():
                    self.samples.append(float(result.stdout.strip().splitlines()[0]) / 100)
                self.stop.wait(self.interval_s)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def busy_fraction(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="Generated training rows.")
    parser.add_argument("--batch-size", type=int, default=256, help="Rows per step.")
    parser.add_argument("--out", type=Path, default=None, help="Write the figures here as JSON.")
    args = parser.parse_args(argv)

    import mmkd  # noqa: F401  (offline defaults)
    import torch
    import yaml

    from mmkd.checkpoints import build_model
    from mmkd.config import TrainConfig, config_from_dict
    from mmkd.data.loading import TensorDataset
    from mmkd.demo import write_demo_config
    from mmkd.training import Runtime, cross_entropy_loss, fit

    if not torch.cuda.is_available():
        print("no CUDA GPU here; run this on a machine with one", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        raw = yaml.safe_load(write_demo_config(Path(folder), quick=False).read_text(encoding="utf-8"))
        config = config_from_dict(raw, base_dir=Path(folder))
    generator = torch.Generator().manual_seed(0)
    rows = TensorDataset(
        inputs={"image": torch.randn(args.rows, 1, 28, 28, generator=generator),
                "audio": 0.1 * torch.randn(args.rows, 8000, generator=generator)},
        mask=torch.ones(args.rows, 2, dtype=torch.bool), labels=torch.randint(0, 10, (args.rows,), generator=generator),
        ids=[str(i) for i in range(args.rows)], splits=["train"] * args.rows, keys=[str(i) for i in range(args.rows)],
        classes=[str(c) for c in range(10)], modalities=["image", "audio"],
    )
    val = rows.take(list(range(512)))
    precisions = ["fp32", *(["bf16"] if torch.cuda.is_bf16_supported() else []), "fp16"]
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": args.rows,
               "batch_size": args.batch_size, "models": {}}
    device = torch.device("cuda")
    for role in ("teacher", "student"):
        figures = {}
        for precision in precisions:
            runtime = Runtime(device=device, precision=precision)
            schedule = TrainConfig(epochs=1, batch_size=args.batch_size, patience=1)
            torch.manual_seed(0)
            model = build_model(config, role, rows.classes).to(device)
            fit(model, rows, val, schedule, cross_entropy_loss, stage=f"{role} warm-up", seed=0, runtime=runtime)
            torch.cuda.synchronize()
            with BusySampler() as sampler:
                started = time.perf_counter()
                fit(model, rows, val, schedule, cross_entropy_loss, stage=role, seed=1, runtime=runtime)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
            figures[precision] = {"rows_per_second": args.rows / seconds, "gpu_busy_fraction": sampler.busy_fraction,
                                  "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20}
            torch.cuda.reset_peak_memory_stats()
            print(f"{role} {precision}: {figures[precision]['rows_per_second']:.0f} rows/s, "
                  f"GPU busy {figures[precision]['gpu_busy_fraction']}", flush=True)
        for precision in precisions[1:]:
            figures[precision]["speedup_over_fp32"] = (figures[precision]["rows_per_second"]
                                                       / figures["fp32"]["rows_per_second"])
        results["models"][role] = figures
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
