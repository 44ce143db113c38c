"""Time a finished run's student and teacher again and print ONNX Runtime's speed-up.

Usage:
    python benchmarks/latency.py RUN_DIR [--iterations N] [--threads N]

Each ratio is PyTorch eager's p50 latency divided by ONNX Runtime's, measured in this
process on the same inputs, so the figures compare engines rather than machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmkd.benchmarking import benchmark_model
from mmkd.checkpoints import load_checkpoint
from mmkd.config import load_config
from mmkd.data.loading import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    args = parser.parse_args()

    config = load_config(args.run_dir / "config.yaml")
    test = load_dataset(config.data, cache_dir=args.run_dir.parent / "cache").subset("test")
    results = []
    for role in ("student", "teacher"):
        model, _ = load_checkpoint(args.run_dir / f"{role}.pt", config)
        rows = benchmark_model(
            role, model, args.run_dir / f"{role}.onnx", test.model_inputs(), batch_sizes=args.batch_sizes,
            providers=config.benchmark.providers, threads=args.threads, warmup=20, iterations=args.iterations,
        )
        for batch_size in args.batch_sizes:
            onnx_row, eager_row = (r for r in rows if r["batch_size"] == batch_size)
            results.append({
                "model": role, "batch_size": batch_size, "provider": onnx_row["provider"],
                "onnx_p50_ms": onnx_row["p50_ms"], "eager_p50_ms": eager_row["p50_ms"],
                "eager_over_onnx": eager_row["p50_ms"] / onnx_row["p50_ms"],
            })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
