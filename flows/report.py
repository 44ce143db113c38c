"""Report flow: the run report, written into the run folder and published as a Prefect artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from mmkd.config import load_config
from mmkd.flows._common import flow_logger
from mmkd.run_report import build_report, render_markdown, write_report


@flow(name="report", description="Build the run report (HTML and markdown) from the run folder; nothing is trained.")
def report_flow(run_dir: str) -> dict:
    """Write report/report.html, report.md and report.json, and publish the markdown as the run-report artifact."""
    folder = Path(run_dir)
    settings = load_config(folder / "config.yaml").report
    report = build_report(folder, map_rows=settings.map_rows, examples=settings.examples)
    paths = write_report(report)
    markdown = render_markdown(report, figure_folder=None)
    create_markdown_artifact(
        key="run-report", markdown=f"{markdown}\nThe page with every figure: `{paths['html']}`\n",
        description=f"Run report of {folder.name}",
    )
    flow_logger().info("Run report: %s", paths["html"])
    return {name: str(path) for name, path in paths.items()}
