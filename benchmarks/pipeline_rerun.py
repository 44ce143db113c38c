"""Time of re-running the pipeline on unchanged data, as a ratio of the first run's time.

Usage:
    python benchmarks/pipeline_rerun.py --fsdd-dir ../shared/data/fsdd \
        --mnist ../shared/data/mnist/mnist_5k.csv.gz [--per-digit 100] [--out DIR]

Builds the audio-visual digits data (100 recordings per digit by default, as `mmkd demo
--quick` does) and the quick demo config, starts Prefect's local server with a throw-away
flow so that its start-up is not timed, then runs the pipeline twice into the same output
folder. The first run decodes the data, trains and exports everything; the second finds
every stage's inputs unchanged and copies the earlier run's files. Both runs are timed
in this process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd-dir", type=Path, required=True, help="Folder of FSDD recordings.")
    parser.add_argument("--mnist", type=Path, required=True, help="MNIST CSV.")
    parser.add_argument("--per-digit", type=int, default=100, help="Recordings per digit.")
    parser.add_argument("--out", type=Path, default=None, help="Working folder; a temporary one by default.")
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="mmkd-rerun-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(out / "prefect-home"))

    from prefect import flow

    from mmkd.data.avdigits import build_avdigits
    from mmkd.demo import write_demo_config
    from mmkd.flows.pipeline import pipeline_flow

    build_avdigits(out / "data", fsdd_dir=args.fsdd_dir, mnist=args.mnist, per_digit=args.per_digit)
    config = write_demo_config(out, quick=True)

    @flow(name="warm-up")
    def warm_up() -> None:
        """Start Prefect's local server before anything is timed."""

    warm_up()

    timings = []
    for attempt in ("first", "unchanged"):
        started = time.perf_counter()
        result = pipeline_flow(str(config), str(out / "runs"))
        timings.append({"run": attempt, "seconds": round(time.perf_counter() - started, 2),
                        "reused": sorted(result["reused"]),
                        "student_accuracy": result["student"]["test"]["accuracy"]})

    ratio = timings[1]["seconds"] / timings[0]["seconds"]
    print(json.dumps({"rows": args.per_digit * 10, "runs": timings, "ratio": round(ratio, 3)}, indent=2))
    print(f"\nunchanged rerun / first run: {timings[1]['seconds']:.1f} s / {timings[0]['seconds']:.1f} s = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
