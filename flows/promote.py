"""Promote flow: replace the registry's student with the run's only if it is not worse."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext

from mmkd.flows._common import flow_logger, load_run_inputs
from mmkd.promotion import promote_if_better, summary_markdown


@flow(name="promote", description="Score the new and the current student on the new test split; promote the better.")
def promote_flow(run_dir: str) -> dict:
    """Record a promotion decision for a finished run in the config's model registry.

    Returns:
        The decision: both accuracies, whether the run's student was promoted, and why.
    """
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)
    registry = config.promotion.registry or paths.run_dir.parent / "registry"
    record = promote_if_better(
        paths.run_dir, registry, dataset.subset("test"),
        min_improvement=config.promotion.min_improvement, max_p50_ms=config.promotion.max_p50_ms,
    )
    logger.info("Student %s: %s", "promoted" if record["promoted"] else "not promoted", record["reason"])
    if FlowRunContext.get() is not None:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key="promotion-decision", markdown=summary_markdown(record, Path(registry)),
            description="Whether the retrained student replaced the current one",
        )
    return record
