"""Training the student in several processes with torchrun.

The distill stage starts `torchrun --standalone --nproc-per-node N -m mmkd.distributed
RUN_DIR`. Every process reads the run's decoded rows and the stored teacher outputs,
trains its share of each batch under DistributedDataParallel (see mmkd.training.fit), and
the first process alone writes the training state and student_distilled.pt. The teacher
is never run, so it is never wrapped: its outputs come from the feature store.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections import deque
from pathlib import Path

import torch.distributed as dist

logger = logging.getLogger(__name__)


def world_size() -> int:
    """Return the number of training processes: 1 unless torchrun started a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Return whether this process writes files: the only one, or rank 0 under torchrun."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def distributed_backend(config) -> str:
    """NCCL when the processes train on GPUs, gloo on the CPU."""
    from mmkd.training import resolve_device

    return "nccl" if resolve_device(config.device).type == "cuda" else "gloo"


def launch_distributed(run_dir: Path, nproc: int, *, backend: str) -> None:
    """Train the run's student in `nproc` processes on this machine; their output goes to the log.

    Raises:
        RuntimeError: when a process fails, with the last lines of the output.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "mmkd.distributed", str(run_dir), "--backend", backend,
    ]
    logger.info("Training the student in %d processes (%s): %s", nproc, backend, " ".join(command))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            logger.info("%s", line.rstrip())
    if process.returncode != 0:
        raise RuntimeError(
            f"distributed training of {run_dir} failed (torchrun exit status {process.returncode}); its last "
            "lines were:\n" + "\n".join(tail)
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of each process torchrun starts: train the run's student, then leave the group."""
    parser = argparse.ArgumentParser(prog="python -m mmkd.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="Run folder with a teacher and its stored outputs.")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="torch.distributed backend.")
    args = parser.parse_args(argv)

    dist.init_process_group(args.backend)
    logging.basicConfig(level=logging.INFO, format=f"[rank {dist.get_rank()}] %(name)s: %(message)s")
    try:
        from mmkd.checkpoints import load_checkpoint
        from mmkd.config import load_config
        from mmkd.data.loading import decode_to_cache, load_decoded
        from mmkd.flows._common import RunPaths, open_store
        from mmkd.flows.distill import train_student

        paths = RunPaths(args.run_dir.resolve())
        config = load_config(paths.config)
        dataset = load_decoded(decode_to_cache(config.data, paths.tensor_cache))
        _, teacher_metadata = load_checkpoint(paths.teacher, config)
        train_student(config, dataset, open_store(paths, config, teacher_metadata["fingerprint"]), paths)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
