"""Training in several processes with torch.distributed (gloo on the CPU), against one process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FSDD_DIR, MNIST_CSV, require_shared_data

from mmkd.checkpoints import load_checkpoint
from mmkd.config import load_config
from mmkd.data.loading import decode_to_cache, load_decoded
from mmkd.distributed import launch_distributed
from mmkd.training import epoch_batches, predict

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.mark.parametrize(("rows", "batch_size"), [(96, 16), (97, 16), (10, 4), (33, 8)])
def test_process_shares_cover_batches(rows, batch_size):
    alone = epoch_batches(rows, batch_size, seed=3, epoch=2)
    shares = [epoch_batches(rows, batch_size, seed=3, epoch=2, rank=r, world=2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(alone)
    for step, batch in enumerate(alone):
        together = shares[0][step] + shares[1][step]
        # An odd row count pads the last batch with a row from the start of the order, as DistributedSampler does.
        assert set(batch) <= set(together)
        assert len(together) - len(batch) in (0, rows % 2)
    assert sorted(sum(alone, [])) == list(range(rows))


def test_two_processes_match_one(tmp_path):
    """Acceptance: 2 processes (gloo) against 1, with neither batch norm nor dropout to differ by design.

    Stated tolerance: every weight within 1e-5 (only the order of gradient sums differs).
    """
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.pt")], check=True, capture_output=True, timeout=300)
    subprocess.run([*TORCHRUN, "--nproc-per-node=2", str(WORKER), str(tmp_path / "two.pt")],
                   check=True, capture_output=True, timeout=300)
    one, two = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    for part in ("student", "objective"):
        for name, value in one[part].items():
            assert torch.allclose(value, two[part][name], rtol=0, atol=1e-5), (part, name)
    for first, second in zip(one["history"], two["history"], strict=True):
        assert first["loss"] == pytest.approx(second["loss"], abs=1e-5)
        assert first["val_accuracy"] == second["val_accuracy"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_server) -> Path:
    """A run folder with the quick demo's teacher and student trained on 400 audio-visual digits."""
    require_shared_data()
    import yaml
    from mmkd.flows.distill import distill_flow
    from mmkd.flows.extract import extract_flow
    from mmkd.flows.teacher import teacher_flow
    from mmkd.flows.validate import validate_flow

    from mmkd.config import config_from_dict, save_config
    from mmkd.data.avdigits import build_avdigits
    from mmkd.demo import write_demo_config

    folder = tmp_path_factory.mktemp("distributed")
    manifest = build_avdigits(folder / "data", fsdd_dir=FSDD_DIR, mnist=MNIST_CSV, per_digit=40)
    raw = yaml.safe_load(write_demo_config(folder, quick=True).read_text(encoding="utf-8"))
    raw.update(device="cpu", data={**raw["data"], "manifest": str(manifest)})
    run_dir = folder / "runs" / "one-process"
    run_dir.mkdir(parents=True)
    save_config(config_from_dict(raw, base_dir=run_dir), run_dir / "config.yaml")
    for stage in (validate_flow, teacher_flow, extract_flow, distill_flow):
        stage(str(run_dir))
    return run_dir


def test_distill_stage_two_processes(finished_run):
    """Acceptance: the real distill stage of an audio-visual digits run, 2 processes against 1.

    The student has batch norm and dropout, which see half a batch in each process, so
    the weights drift apart. Stated tolerance: validation accuracy within 0.05, and test
    predictions agreeing on at least 85% of rows.
    """
    copy = finished_run.with_name("two-processes")
    shutil.copytree(finished_run, copy)
    (copy / "student_distilled.pt").unlink()
    launch_distributed(copy, 2, backend="gloo")

    config = load_config(copy / "config.yaml")
    one, one_metadata = load_checkpoint(finished_run / "student_distilled.pt", config)
    two, two_metadata = load_checkpoint(copy / "student_distilled.pt", config)
    assert (one_metadata["training"]["processes"], two_metadata["training"]["processes"]) == (1, 2)
    assert abs(one_metadata["training"]["best_val_accuracy"] - two_metadata["training"]["best_val_accuracy"]) <= 0.05
    test = load_decoded(decode_to_cache(config.data, copy.parent / "cache")).subset("test")
    agreement = float((predict(one, test)[0].argmax(1) == predict(two, test)[0].argmax(1)).float().mean())
    print(f"val accuracy {one_metadata['training']['best_val_accuracy']:.4f} (1 process), "
          f"{two_metadata['training']['best_val_accuracy']:.4f} (2 processes); test agreement {agreement:.4f}")
    assert agreement >= 0.85
    # The training state is gone once the student is saved, and only the first process wrote files.
    assert not (copy / "checkpoints" / "distill").exists()
