"""Pipeline flow: every stage in order, as subflows, in a fresh run folder; unchanged stages are reused."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mmkd.flows._common import flow_logger
from mmkd.flows.benchmark import benchmark_flow
from mmkd.flows.distill import distill_flow
from mmkd.flows.evaluate import evaluate_flow
from mmkd.flows.export import export_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.promote import promote_flow
from mmkd.flows.report import report_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.flows.validate import use_kept_rows, validate_flow
from prefect import flow, tags
from prefect.context import FlowRunContext

from mmkd import __version__
from mmkd.config import RunConfig, load_config, save_config
from mmkd.models.text import prefetch as prefetch_pretrained
from mmkd.reports import metrics_rows, p50
from mmkd.runs import atomic_write_json, atomic_write_text, new_run_dir, unfinished_run
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
    if (run_dir / "report" / "report.html").is_file():
        links.append(("Run report", run_dir / "report" / "report.html"))
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


@dataclass
class RunStart:
    """A run folder ready for its stages, and the record of stages reused from earlier runs."""

    config: RunConfig
    out: Path
    run_dir: Path
    keys: dict[str, str]
    data_fingerprint: str
    reuse: bool
    reused: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str, stage_flow) -> dict | list:
        """Run one stage's flow in the run folder, or copy its files from an earlier run with the same key."""
        if self.reuse:
            restored = StageCache(self.out / "stage-cache").restore(name, self.keys[name], self.run_dir)
            if restored is not None:
                result, source = restored
                self.reused[name] = str(source)
                flow_logger().info("Stage %s unchanged since %s; its files were copied from there", name, source.name)
                return result
        result = stage_flow(str(self.run_dir))
        StageCache(self.out / "stage-cache").store(name, self.keys[name], self.run_dir, result)
        return result


def start_run(config: RunConfig, out_dir: Path, *, kind: str, reuse: bool, resume: bool) -> RunStart:
    """Create the run folder (or find the unfinished one of this config) with the resolved config in it.

    `kind` separates runs of the same config: "" for the pipeline, "tune" for a search.
    """
    logger = flow_logger()
    out = Path(out_dir).resolve()
    fingerprint = config.fingerprint() + (f":{kind}" if kind else "")
    run_dir = unfinished_run(out, fingerprint, finished_file="tune.json" if kind == "tune" else "metrics.json") \
        if resume else None
    if run_dir is not None:
        logger.info("Resuming run folder %s, which stopped before the end: finished stages are kept and "
                    "training continues from its last saved state", run_dir)
    else:
        run_dir = new_run_dir(out, f"{config.name}-{kind + '-' if kind else ''}seed{config.seed}")
        logger.info("Run folder %s", run_dir)
    # The run folder starts with the resolved config, which every stage reads.
    save_config(config, run_dir / "config.yaml")
    atomic_write_json(run_dir / "run.json", {"config_fingerprint": fingerprint, "mmkd_version": __version__})
    # With downloads allowed, pretrained text models are fetched once here; stages read the cache.
    prefetch_pretrained(config)

    # Keys come from the config as given, before validation may point it at a clean manifest.
    data_fingerprint = dataset_fingerprint(config, out / "cache" / "data-fingerprints")
    return RunStart(config, out, run_dir, stage_keys(config, data_fingerprint), data_fingerprint, reuse)


def run_teacher_stages(run: RunStart) -> tuple[dict, dict, dict]:
    """Validate the data, train (or reuse) the teacher and store its outputs; return the three stages' results."""
    # Validation first: it stops the run or sets bad rows aside before anything trains.
    validation = run.stage("validate", validate_flow)
    if "validate" in run.reused:
        use_kept_rows(str(run.run_dir), validation)
    teacher = run.stage("teacher", teacher_flow)
    features = extract_flow(str(run.run_dir))
    return validation, teacher, features


@flow(name="pipeline", description="validate, teacher, extract, distill, finetune, evaluate, export, benchmark and promote in one run.")
def pipeline_flow(
    config_path: str, out_dir: str, seed: int | None = None, manifest: str | None = None, reuse: bool = True,
    resume: bool = True,
) -> dict:
    """Run every stage for one config and write metrics.json in the new run folder.

    A stage whose inputs (the config sections it reads, the stages before it and, for
    validation, the dataset's content) match an earlier run's is not run again: its files
    are copied from that run (see mmkd.stage_cache).

    A run of the same config that stopped before the end, killed or failed, is resumed
    in its own folder: its finished stages are kept and a training stage continues from
    its last saved state (see mmkd.train_state).

    Args:
        config_path: The YAML run config.
        out_dir: Folder that receives the run folder, the shared caches and `latest`.
        seed: Replaces the config's seed, e.g. for repeated runs.
        manifest: Replaces the config's manifest, e.g. the one a watcher saw change.
        reuse: Reuse unchanged stages of earlier runs; False runs every stage.
        resume: Continue an unfinished run of the same config; False always starts a new run folder.

    Returns:
        The metrics, with "run_dir", "benchmark" and "reused" (stage -> source run) added.
    """
    logger = flow_logger()
    overrides = {"seed": seed} if seed is not None else None
    config: RunConfig = load_config(config_path, overrides)
    if manifest is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"manifest": Path(manifest).resolve()})})

    run = start_run(config, Path(out_dir), kind="", reuse=reuse, resume=resume)
    run_dir = run.run_dir

    # Every stage's flow and task runs carry the mmkd tag, as the deployments do.
    with tags("mmkd"):
        validation, teacher, features = run_teacher_stages(run)
        # The student trained against the teacher's stored outputs.
        run.stage("distill", distill_flow)
        run.stage("finetune", finetune_flow)

        # Score, ship and time the models.
        evaluation = run.stage("evaluate", evaluate_flow)
        parity = run.stage("export", export_flow)
        benchmark = run.stage("benchmark", benchmark_flow)

    metrics = {
        "run": {"name": config.name, "seed": config.seed, "config_fingerprint": config.fingerprint(),
                "mmkd_version": __version__, "device": str(resolve_device(config.device)),
                "data_fingerprint": run.data_fingerprint, "stage_keys": run.keys, "reused": run.reused},
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
    _link_latest(run.out, run_dir)

    report = None
    if config.report.enabled:
        with tags("mmkd"):
            report = report_flow(str(run_dir))

    # Last, the gate: the registry's student is replaced only by one that is not worse.
    promotion = None
    if config.promotion.enabled:
        with tags("mmkd"):
            promotion = promote_flow(str(run_dir))
    _publish(metrics, benchmark, run_dir, run.reused, promotion)
    latency = p50(benchmark, "student", "onnxruntime", 1)
    logger.info(
        "Test accuracy: teacher %.4f, student %.4f, baseline %.4f, ONNX student %.4f; ONNX student p50 at batch 1: %s",
        metrics["teacher"]["test"]["accuracy"], metrics["student"]["test"]["accuracy"],
        metrics["baseline"]["test"]["accuracy"], metrics["onnx"]["test"]["accuracy"],
        "not measured" if latency is None else f"{latency:.3f} ms",
    )
    return {**metrics, "run_dir": str(run_dir), "benchmark": benchmark, "reused": run.reused, "promotion": promotion,
            "report": report}
