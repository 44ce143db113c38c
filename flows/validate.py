"""Validate flow: check the manifest and its files before any training."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext

from mmkd.config import load_config, save_config
from mmkd.errors import DataError
from mmkd.flows._common import RunPaths, flow_logger
from mmkd.validation.validate import ValidationResult, validate_manifest


def _publish(result: ValidationResult, report: dict) -> None:
    """Show the outcome as Prefect table and markdown artifacts when running as a flow."""
    if FlowRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        key="validation-checks",
        table=[{"check": c["name"], "severity": c["severity"], "success": c["success"],
                "unexpected": c.get("unexpected_count")} for c in report["checks"]],
        description="Great Expectations checks over the probe table",
    )
    create_markdown_artifact(
        key="validation-summary",
        markdown=(
            f"## Validation {'passed' if result.passed else 'failed'}\n\n{result.message}\n\n"
            f"| rows in | kept | quarantined | critical check failures |\n| ---: | ---: | ---: | ---: |\n"
            f"| {result.rows_in} | {result.rows_kept} | {result.rows_quarantined} | {result.critical_failures} |\n\n"
            f"Report: `{result.report}`  \nData Docs: `{report['data_docs_index']}`\n"
        ),
        description="Data validation summary",
    )


def _problem_list(problems: list[dict], *, named_rows: int = 200, full_reasons: int = 10) -> str:
    """List the rows with problems by number and id, then the first reasons in full."""
    rows = list(dict.fromkeys((p["row_number"], p["row_id"]) for p in problems))
    if not rows:
        return ""
    names = ", ".join(f"{number} ({row_id!r})" if row_id else str(number) for number, row_id in rows[:named_rows])
    more = f" and {len(rows) - named_rows} more" if len(rows) > named_rows else ""
    reasons = "".join(f" {p['message']}." for p in problems[:full_reasons])
    return f" Rows with problems: {names}{more}.{reasons}"


@flow(name="validate", description="Probe every row, run the Great Expectations checks, quarantine or stop.")
def validate_flow(run_dir: str) -> dict:
    """Validate the run's data; with quarantined rows, point the run's config at the clean manifest.

    Raises:
        DataError: validation failed; the message names the report with every problem.
    """
    paths = RunPaths(Path(run_dir))
    config = load_config(paths.config)
    result = validate_manifest(config, paths.run_dir / "validation")
    report = json.loads(result.report.read_text(encoding="utf-8"))
    _publish(result, report)

    if not result.passed:
        raise DataError(f"Validation failed: {result.message}.{_problem_list(report['problems'])} "
                        f"Every problem is in {result.report}.")

    summary = {"passed": result.passed, "rows_in": result.rows_in, "rows_kept": result.rows_kept,
               "rows_quarantined": result.rows_quarantined, "critical_failures": result.critical_failures,
               "report": str(result.report), "clean_manifest": str(result.clean_manifest),
               "data_root": report["data_root"]}
    use_kept_rows(run_dir, summary)
    return summary


def use_kept_rows(run_dir: str, summary: dict) -> None:
    """Point the run's config at the clean manifest: exactly the rows validation checked and kept.

    Later stages read it even when no row was set aside, so rows appended to the original
    manifest while the run goes on never reach training unchecked.
    """
    paths = RunPaths(Path(run_dir))
    config = load_config(paths.config)
    data = config.data.model_copy(update={"manifest": Path(summary["clean_manifest"]), "root": Path(summary["data_root"])})
    save_config(config.model_copy(update={"data": data}), paths.config)
    flow_logger().info("Later stages read %s (%d rows kept, %d set aside)", summary["clean_manifest"],
                       summary["rows_kept"], summary["rows_quarantined"])
