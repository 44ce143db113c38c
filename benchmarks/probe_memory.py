"""Peak memory of probing a manifest of N rows, as a ratio against a smaller manifest.

Usage:
    python benchmarks/probe_memory.py [--small 10000] [--large 100000]

Each size runs in its own Python process, which builds a manifest of generated rows
(each row names one of a few real files written by the script), streams the probe
records to a CSV, and reports its peak resident memory. The ratio large/small shows
whether memory grows with the manifest; it should stay well under the rows' ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

WORKER = textwrap.dedent('''
    import json, resource, sys, time, wave
    from pathlib import Path
    import numpy as np
    import pandas as pd
    from PIL import Image
    from mmkd.manifest import read_manifest
    from mmkd.validation.probes import probe_manifest, write_probe_table

    rows, folder = int(sys.argv[1]), Path(sys.argv[2])
    for index in range(4):
        Image.fromarray(np.full((28, 28), 50 * index, dtype=np.uint8), mode="L").save(folder / f"{index}.png")
        with wave.open(str(folder / f"{index}.wav"), "wb") as recording:
            recording.setnchannels(1)
            recording.setsampwidth(2)
            recording.setframerate(8000)
            recording.writeframes((np.sin(np.arange(4000) * (index + 1) / 10) * 8000).astype("<i2").tobytes())
    pd.DataFrame({
        "id": [f"row-{i}" for i in range(rows)],
        "label": [str(i % 10) for i in range(rows)],
        "image": [f"{i % 4}.png" for i in range(rows)],
        "audio": [f"{i % 4}.wav" for i in range(rows)],
    }).to_csv(folder / "manifest.csv", index=False)

    started = time.perf_counter()
    manifest = read_manifest(folder / "manifest.csv")
    written = write_probe_table(probe_manifest(manifest), folder / "probes.csv")
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": written, "seconds": seconds, "peak_mib": peak_mib}))
''')


def measure(rows: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        output = subprocess.run(
            [sys.executable, "-c", WORKER, str(rows), folder], capture_output=True, text=True, check=True
        ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    small, large = measure(args.small), measure(args.large)
    print(json.dumps({"small": small, "large": large, "peak_ratio": large["peak_mib"] / small["peak_mib"]}, indent=2))


if __name__ == "__main__":
    main()
