"""Pipeline flow: every stage in order, as subflows, in a fresh run folder; unchanged stages are reused."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, tags
from prefect.context import FlowRunContext

from mmkd import __version__
from mmkd.config import RunConfig, load_config, save_config
from mmkd.flows.benchmark import benchmark_flow
from mmkd.flows.distill import distill_flow
from mmkd.flows.evaluate import evaluate_flow
from mmkd.flows.export import export_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.promote import promote_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.flows.validate import use_kept_rows, validate_flow
from mmkd.flows._common import flow_logger
from mmkd.models.text import prefetch as prefetch_pretrained
from mmkd.reports import metrics_rows, p50
from mmkd.runs import atomic_write_json, atomic_write_text, new_run_dir
from mmkd.serving import model_card
from mmkd.stage_cache import StageCache, dataset_fingerprint, stage_keys
from mmkd.training import resolve_device


def _link_latest(out_dir: Path, run_dir: Path) -> None:
    """Point `out_dir/latest` at the newest run folder, replacing the link atomically."""
    link = out_dir / "latest"
    temporary = out_dir / f".latest-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(temporary, link)


def _publish(metrics: dict, benchmark: list[dict], run_dir: Path, reused: dict[str, str], promotion: dict | None) -> None:
    """Show the run as Prefect table and markdown artifacts."""
    if FlowRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        key="metrics", table=metrics_rows(metrics, benchmark),
        description=f"Test metrics of run {run_dir.name}: teacher, distilled student, label-only baseline and ONNX student",
    )
    report = Path(metrics["validation"]["report"])
    # Found in this run's folder: a reused validation's report names the earlier run's copy.
    data_docs = min((run_dir / "validation").rglob("index.html"), key=lambda page: len(page.parts), default=None)
    links = [("Run folder", run_dir), ("Metrics", run_dir / "metrics.json"), ("Benchmark", run_dir / "benchmark.md"),
             ("Model card", run_dir / "model_repository" / "student" / "model_card.md"), ("Validation report", report)]
    if data_docs:
        links.append(("Data Docs", Path(data_docs)))
    reused_text = ", ".join(f"{stage} (from {Path(source).name})" for stage, source in reused.items()) or "none"
    create_markdown_artifact(
        key="run-summary",
        markdown=(
            f"## Run {run_dir.name}\n\n"
            f"Test accuracy: teacher {metrics['teacher']['test']['accuracy']:.4f}, "
            f"student {metrics['student']['test']['accuracy']:.4f}, "
            f"baseline {metrics['baseline']['test']['accuracy']:.4f}, "
            f"ONNX student {metrics['onnx']['test']['accuracy']:.4f}.\n\n"
            f"Stages reused from earlier runs: {reused_text}.\n\n"
            f"Promotion: {_promotion_text(promotion)}.\n\n"
            + "".join(f"- [{name}]({path.resolve().as_uri()}): `{path}`\n" for name, path in links)
        ),
        description="What the run produced, with links to its files",
    )


def _promotion_text(promotion: dict | None) -> str:
    if promotion is None:
        return "off (promotion.enabled is false)"
    return f"{'promoted' if promotion['promoted'] else 'not promoted'}, {promotion['reason']}"


@flow(name="pipeline", description="validate, teacher, extract, distill, finetune, evaluate, export, benchmark and promote in one run.")
def pipeline_flow(
    config_path: str, out_dir: str, seed: int | None = None, manifest: str | None = None, reuse: bool = True
) -> dict:
    """Run every stage for one config and write metrics.json in the new run folder.

    A stage whose inputs (the config sections it reads, the stages before it and, for
    validation, the dataset's content) match an earlier run's is not run again: its files
    are copied from that run (see mmkd.stage_cache).

    Args:
        config_path: The YAML run config.
        out_dir: Folder that receives the run folder, the shared caches and `latest`.
        seed: Replaces the config's seed, e.g. for repeated runs.
        manifest: Replaces the config's manifest, e.g. the one a watcher saw change.
        reuse: Reuse unchanged stages of earlier runs; False runs every stage.

    Returns:
        The metrics, with "run_dir", "benchmark" and "reused" (stage -> source run) added.
    """
    logger = flow_logger()
    overrides = {"seed": seed} if seed is not None else None
    config: RunConfig = load_config(config_path, overrides)
    if manifest is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"manifest": Path(manifest).resolve()})})

    # The run folder starts with the resolved config, which every stage reads.
    out = Path(out_dir).resolve()
    run_dir = new_run_dir(out, f"{config.name}-seed{config.seed}")
    save_config(config, run_dir / "config.yaml")
    logger.info("Run folder %s", run_dir)
    # With downloads allowed, pretrained text models are fetched once here; stages read the cache.
    prefetch_pretrained(config)

    # Keys come from the config as given, before validation may point it at a clean manifest.
    cache = StageCache(out / "stage-cache")
    data_fingerprint = dataset_fingerprint(config, out / "cache" / "data-fingerprints")
    keys = stage_keys(config, data_fingerprint)
    reused: dict[str, str] = {}

    def stage(name: str, stage_flow) -> dict | list:
        if reuse:
            restored = cache.restore(name, keys[name], run_dir)
            if restored is not None:
                result, source = restored
                reused[name] = str(source)
                logger.info("Stage %s unchanged since %s; its files were copied from there", name, source.name)
                return result
        result = stage_flow(str(run_dir))
        cache.store(name, keys[name], run_dir, result)
        return result

    # Every stage's flow and task runs carry the mmkd tag, as the deployments do.
    with tags("mmkd"):
        # Validation first: it stops the run or sets bad rows aside before anything trains.
        validation = stage("validate", validate_flow)
        if "validate" in reused:
            use_kept_rows(str(run_dir), validation)

        # Teacher, its cached outputs, then the student trained against them.
        teacher = stage("teacher", teacher_flow)
        features = extract_flow(str(run_dir))
        stage("distill", distill_flow)
        stage("finetune", finetune_flow)

        # Score, ship and time the models.
        evaluation = stage("evaluate", evaluate_flow)
        parity = stage("export", export_flow)
        benchmark = stage("benchmark", benchmark_flow)

    metrics = {
        "run": {"name": config.name, "seed": config.seed, "config_fingerprint": config.fingerprint(),
                "mmkd_version": __version__, "device": str(resolve_device(config.device)),
                "data_fingerprint": data_fingerprint, "stage_keys": keys, "reused": reused},
        "teacher": {**evaluation["teacher"], "val": teacher["val"], "fingerprint": teacher["fingerprint"]},
        "student": evaluation["student"],
        "baseline": evaluation["baseline"],
        "onnx": {
            "test": {"accuracy": parity["student"]["accuracy"], "macro_f1": parity["student"]["macro_f1"],
                     "agreement_with_pytorch": parity["student"]["agreement_with_pytorch"]},
            "parity_max_abs_diff": parity["student"]["max_abs_diff"],
            "parity": parity,
        },
        "features": features,
        "validation": validation,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_text(run_dir / "model_repository" / "student" / "model_card.md",
                      model_card(metrics, benchmark, run_name=run_dir.name))
    _link_latest(out, run_dir)

    # Last, the gate: the registry's student is replaced only by one that is not worse.
    promotion = None
    if config.promotion.enabled:
        with tags("mmkd"):
            promotion = promote_flow(str(run_dir))
    _publish(metrics, benchmark, run_dir, reused, promotion)
    latency = p50(benchmark, "student", "onnxruntime", 1)
    logger.info(
        "Test accuracy: teacher %.4f, student %.4f, baseline %.4f, ONNX student %.4f; ONNX student p50 at batch 1: %s",
        metrics["teacher"]["test"]["accuracy"], metrics["student"]["test"]["accuracy"],
        metrics["baseline"]["test"]["accuracy"], metrics["onnx"]["test"]["accuracy"],
        "not measured" if latency is None else f"{latency:.3f} ms",
    )
    return {**metrics, "run_dir": str(run_dir), "benchmark": benchmark, "reused": reused, "promotion": promotion}
