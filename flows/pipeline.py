"""Pipeline flow: every stage in order, as subflows, in a fresh run folder."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mmkd import __version__
from mmkd.config import load_config, save_config
from mmkd.flows.benchmark import benchmark_flow
from mmkd.flows.distill import distill_flow
from mmkd.flows.evaluate import evaluate_flow
from mmkd.flows.export import export_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.flows.validate import validate_flow
from mmkd.flows._common import flow_logger
from mmkd.runs import atomic_write_json, new_run_dir
from mmkd.training import resolve_device


@flow(name="pipeline", description="validate, teacher, extract, distill, finetune, evaluate, export and benchmark in one run.")
def pipeline_flow(config_path: str, out_dir: str, seed: int | None = None) -> dict:
    """Run every stage for one config and write metrics.json in the new run folder.

    Args:
        config_path: The YAML run config.
        out_dir: Folder that receives the run folder and the shared caches.
        seed: Replaces the config's seed, e.g. for repeated runs.

    Returns:
        The metrics, with "run_dir" added.
    """
    logger = flow_logger()
    overrides = {"seed": seed} if seed is not None else None
    config = load_config(config_path, overrides)

    # The run folder starts with the resolved config, which every stage reads.
    run_dir = new_run_dir(Path(out_dir), f"{config.name}-seed{config.seed}")
    save_config(config, run_dir / "config.yaml")
    logger.info("Run folder %s", run_dir)

    # Validation first: it stops the run or sets bad rows aside before anything trains.
    validation = validate_flow(str(run_dir))

    # Teacher, its cached outputs, then the student trained against them.
    teacher = teacher_flow(str(run_dir))
    features = extract_flow(str(run_dir))
    distill_flow(str(run_dir))
    finetune_flow(str(run_dir))

    # Score, ship and time the models.
    evaluation = evaluate_flow(str(run_dir))
    parity = export_flow(str(run_dir))
    benchmark = benchmark_flow(str(run_dir))

    metrics = {
        "run": {"name": config.name, "seed": config.seed, "config_fingerprint": config.fingerprint(),
                "mmkd_version": __version__, "device": str(resolve_device(config.device))},
        "teacher": {**evaluation["teacher"], "val": teacher["val"], "fingerprint": teacher["fingerprint"]},
        "student": evaluation["student"],
        "baseline": evaluation["baseline"],
        "onnx": {
            "test": {"accuracy": parity["student"]["accuracy"],
                     "agreement_with_pytorch": parity["student"]["agreement_with_pytorch"]},
            "parity_max_abs_diff": parity["student"]["max_abs_diff"],
            "parity": parity,
        },
        "features": features,
        "validation": validation,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    logger.info(
        "Test accuracy: teacher %.4f, student %.4f, baseline %.4f, ONNX student %.4f",
        metrics["teacher"]["test"]["accuracy"], metrics["student"]["test"]["accuracy"],
        metrics["baseline"]["test"]["accuracy"], metrics["onnx"]["test"]["accuracy"],
    )
    return {**metrics, "run_dir": str(run_dir), "benchmark": benchmark}
