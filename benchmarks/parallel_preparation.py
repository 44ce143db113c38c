"""Decoding files in DataLoader workers, and extracting teacher outputs on Dask workers, against one process.

Usage:
    python benchmarks/parallel_preparation.py [--per-digit 200] [--workers 2] [--repeats 3]

Both measurements use the audio-visual digits data built from the real FSDD recordings
and MNIST images (`--per-digit` rows per digit) and report the median of `--repeats`
alternating runs of each side, and their ratio (one process over several):

1. Decoding: `load_dataset` with data.decode_workers 0 and `--workers`, without the cache.
2. Extraction: the extract flow with extract.workers 1 and `--workers`, into empty
   feature stores, with the demo's teacher architecture (random weights: its cost does
   not depend on them). The local Dask cluster's start-up is included, as a run pays it.
   A third side runs on a Dask cluster of `--workers` processes started beforehand
   (extract.cluster_address), which leaves the start-up out.

Prefect runs against a temporary test server on 127.0.0.1, as in the tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="mmkd-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def demo_config(manifest: Path, **changes):
    """Return the packaged audio-visual digits config on `manifest`, on the CPU, with section `changes`."""
    import yaml

    from mmkd.config import config_from_dict

    raw = yaml.safe_load((Path(__file__).parents[1] / "src" / "mmkd" / "configs" / "avdigits.yaml").read_text())
    raw["data"]["manifest"] = str(manifest)
    raw["device"] = "cpu"
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw, base_dir=manifest.parent)


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_decoding(manifest: Path, workers: int, repeats: int) -> dict:
    from mmkd.data.loading import load_dataset

    configs = {0: demo_config(manifest).data, workers: demo_config(manifest, data={"decode_workers": workers}).data}
    times: dict[int, list[float]] = {0: [], workers: []}
    rows = len(load_dataset(configs[0]))
    for _ in range(repeats):
        for count, data in configs.items():
            times[count].append(seconds(lambda data=data: load_dataset(data)))
    return {"rows": rows, **{count: statistics.median(values) for count, values in times.items()}}


def time_extraction(manifest: Path, root: Path, workers: int, cluster_address: str, repeats: int) -> dict:
    from mmkd.checkpoints import build_model, save_checkpoint
    from mmkd.config import save_config
    from mmkd.data.loading import decode_to_cache
    from mmkd.flows.extract import extract_flow

    folders = {}
    sides = {"one process": {"workers": 1}, "local cluster": {"workers": workers},
             "running cluster": {"workers": workers, "cluster_address": cluster_address}}
    for side, extract in sides.items():
        config = demo_config(manifest, extract=extract)
        config.feature_store = root / f"store-{side}"
        folder = root / f"run-{side}"
        folder.mkdir()
        save_config(config, folder / "config.yaml")
        classes = [str(d) for d in range(10)]
        save_checkpoint(folder / "teacher.pt", build_model(config, "teacher", classes), config, "teacher", classes)
        folders[side] = (folder, config.feature_store)
    # Every side reads the decoded rows from the shared cache, so decoding is not timed here.
    decode_to_cache(config.data, root / "cache")

    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, (folder, store) in folders.items():
            shutil.rmtree(store, ignore_errors=True)
            times[side].append(seconds(lambda folder=folder: extract_flow(str(folder))))
    return {side: statistics.median(values) for side, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-digit", type=int, default=200, help="Rows per digit (FSDD has 300 recordings per digit).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from mmkd.data.avdigits import build_avdigits

    root = Path(tempfile.mkdtemp(prefix="mmkd-parallel-"))
    manifest = build_avdigits(root / "data", fsdd_dir=SHARED_DATA / "fsdd", mnist=SHARED_DATA / "mnist" / "mnist_5k.csv.gz",
                              per_digit=args.per_digit)
    decoding = time_decoding(manifest, args.workers, args.repeats)
    print(f"decoding {decoding['rows']} rows: {decoding[0]:.2f} s in one process, {decoding[args.workers]:.2f} s with "
          f"{args.workers} DataLoader workers, speed-up {decoding[0] / decoding[args.workers]:.2f}")
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")
    with cluster, prefect_test_harness(server_startup_timeout=180):
        extraction = time_extraction(manifest, root, args.workers, cluster.scheduler_address, args.repeats)
    alone = extraction["one process"]
    for side, elapsed in extraction.items():
        print(f"extracting {decoding['rows']} rows, {side} ({1 if side == 'one process' else args.workers} workers): "
              f"{elapsed:.2f} s, speed-up {alone / elapsed:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
