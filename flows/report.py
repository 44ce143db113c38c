"""Report flow: the run report, written into the run folder and published as a Prefect artifact."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from mmkd.config import load_config
from mmkd.flows._common import flow_logger
from mmkd.run_report import build_report, render_markdown, write_report
from mmkd.tracking import TENSORBOARD_FOLDER, log_to_mlflow, write_report_events


@flow(name="report", description="Build the run report (HTML and markdown) from the run folder; nothing is trained.")
def report_flow(run_dir: str) -> dict:
    """Write report/report.html, report.md and report.json, and publish the markdown as the run-report artifact.

    With tracking.tensorboard, the report's scores, figures and embeddings also go to
    <run>/tensorboard/report. With tracking.mlflow, the run is logged to MLflow.
    """
    folder = Path(run_dir)
    config = load_config(folder / "config.yaml")
    report = build_report(folder, map_rows=config.report.map_rows, examples=config.report.examples)
    paths = write_report(report)
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else None
    if config.tracking.tensorboard:
        write_report_events(report, folder / TENSORBOARD_FOLDER / "report", metrics)
    result = {name: str(path) for name, path in paths.items()}
    if config.tracking.mlflow and metrics is not None:
        result["mlflow_run_id"] = log_to_mlflow(folder, config, metrics, report.numbers["history"],
                                                default_root=folder.parent)
        flow_logger().info("MLflow run %s", result["mlflow_run_id"])
    markdown = render_markdown(report, figure_folder=None)
    create_markdown_artifact(
        key="run-report", markdown=f"{markdown}\nThe page with every figure: `{paths['html']}`\n",
        description=f"Run report of {folder.name}",
    )
    flow_logger().info("Run report: %s", paths["html"])
    return result
