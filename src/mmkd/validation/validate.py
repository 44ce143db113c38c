"""The validate stage: probe every row, run the checks, apply the policy, write the outputs.

Outputs, all under the output folder:
    probes.csv: one probe record per manifest row.
    validation.json: every check with its observed value and result, the row counts and
        the decision.
    quarantine.csv: one line per row set aside, with every reason.
    manifest.clean.csv: the rows kept, for the next stages (paths stay relative to the
        original manifest's folder, which the next stages get as data.root).
    gx/: the Great Expectations project and its Data Docs.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mmkd.config import RunConfig
from mmkd.manifest import read_manifest, write_manifest
from mmkd.runs import atomic_write, atomic_write_json
from mmkd.validation.gx_suite import Check, build_checks, run_suite
from mmkd.validation.probes import probe_manifest, write_probe_table
from mmkd.validation.rows import Problem, add_dataset_columns, row_problems

logger = logging.getLogger(__name__)

QUARANTINE_COLUMNS = ("id", "row_number", "reasons", "checks", "columns", "values")


@dataclass(frozen=True)
class ValidationResult:
    """The decision of one validation run and where its outputs are."""

    passed: bool
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    critical_failures: int
    report: Path
    clean_manifest: Path | None
    message: str


def _dataset_checks() -> list[Check]:
    """Checks over the columns `add_dataset_columns` computes."""
    import great_expectations as gx

    return [
        Check(
            name=f"{modality}_in_one_split",
            severity="critical",
            expectation=gx.expectations.ExpectColumnValuesToBeBetween(
                column=f"{modality}_split_count", min_value=1, max_value=1
            ),
            description=f"No {modality} content appears in two splits (leakage).",
        )
        for modality in ("image", "audio")
    ] + [
        Check(
            name="content_one_label",
            severity="critical",
            expectation=gx.expectations.ExpectColumnValuesToBeBetween(
                column="content_label_count", min_value=1, max_value=1
            ),
            description="Rows with the same content carry the same label.",
        )
    ]


def _write_quarantine(path: Path, problems: dict[str, list[Problem]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(QUARANTINE_COLUMNS)
            for row_id, found in problems.items():
                writer.writerow([
                    row_id, found[0].row_number,
                    " | ".join(p.message for p in found),
                    " | ".join(p.check for p in found),
                    " | ".join(p.column for p in found),
                    " | ".join(p.value for p in found),
                ])

    atomic_write(path, write)


def validate_manifest(config: RunConfig, out_dir: Path) -> ValidationResult:
    """Validate the config's manifest and write the outputs listed in the module docstring.

    With `validation.on_failure: stop`, any critical problem fails validation. With
    `quarantine`, rows with problems are set aside and validation fails only when more
    than `validation.max_quarantined_fraction` of the rows are, or a dataset-wide
    check (such as the rows per class) fails on the rows kept.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, policy = config.data, config.validation
    manifest = read_manifest(data.manifest, modalities=data.modalities, split_fractions=data.split_fractions, root=data.root)
    classes = list(data.classes) if data.classes is not None else sorted({str(v) for v in manifest.frame["label"]})

    # Probe every row, streaming the records to disk, then add the cross-row columns.
    rows_in = write_probe_table(probe_manifest(manifest), out_dir / "probes.csv")
    raw = pd.read_csv(out_dir / "probes.csv", dtype={"id": str, "label": str})
    probes = add_dataset_columns(raw)

    # Per-row reasons decide which rows are set aside.
    problems: dict[str, list[Problem]] = {}
    for record in probes.to_dict("records"):
        found = row_problems(record, classes=classes, sample_rate_hz=data.audio.sample_rate_hz)
        if found:
            problems[str(record["id"])] = found
    quarantined = set(problems)

    # The Great Expectations suite runs over the rows that stay, with the cross-row
    # columns computed again among them.
    if policy.on_failure == "quarantine":
        kept_probes = add_dataset_columns(raw[~raw["id"].astype(str).isin(quarantined)])
    else:
        kept_probes = probes
    checks = build_checks(
        classes=classes, sample_rate_hz=data.audio.sample_rate_hz, min_rows_per_class=policy.min_rows_per_class
    ) + _dataset_checks()
    suite = run_suite(kept_probes.reset_index(drop=True), checks, run_dir=out_dir)

    fraction = len(quarantined) / rows_in if rows_in else 0.0
    rows_quarantined = len(quarantined) if policy.on_failure == "quarantine" else 0
    if policy.on_failure == "stop":
        passed = not problems and suite["critical_failures"] == 0
        message = (f"{len(problems)} of {rows_in} rows have critical problems" if problems
                   else f"{suite['critical_failures']} critical checks failed")
        rows_kept = rows_in
    else:
        passed = fraction <= policy.max_quarantined_fraction and suite["critical_failures"] == 0
        message = (f"{len(quarantined)} of {rows_in} rows set aside ({fraction:.1%}, limit "
                   f"{policy.max_quarantined_fraction:.1%}); {suite['critical_failures']} critical checks failed on the rest")
        rows_kept = rows_in - rows_quarantined
    if passed:
        message = f"{rows_kept} of {rows_in} rows kept"

    # Outputs: the quarantine list, the clean manifest and the report.
    _write_quarantine(out_dir / "quarantine.csv", problems)
    clean_manifest = None
    if passed:
        clean = manifest.frame[~manifest.frame["id"].astype(str).isin(quarantined)] if policy.on_failure == "quarantine" else manifest.frame
        clean_manifest = write_manifest(clean.reset_index(drop=True), out_dir / "manifest.clean.csv")
    report = atomic_write_json(out_dir / "validation.json", {
        "passed": passed,
        "message": message,
        "policy": policy.model_dump(),
        "manifest": str(manifest.path),
        "data_root": str(manifest.root),
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "rows_quarantined": rows_quarantined,
        "rows_with_problems": len(problems),
        "problems": [p.__dict__ for found in problems.values() for p in found],
        "checks": suite["checks"],
        "critical_failures": suite["critical_failures"],
        "warning_failures": suite["warning_failures"],
        "data_docs_index": suite["data_docs_index"],
        "clean_manifest": str(clean_manifest) if clean_manifest else None,
    })
    logger.info("Validation %s: %s", "passed" if passed else "failed", message)
    for found in list(problems.values())[:20]:
        for problem in found:
            logger.info("  %s", problem.message)
    return ValidationResult(
        passed=passed,
        rows_in=rows_in,
        rows_kept=rows_kept,
        rows_quarantined=rows_quarantined,
        critical_failures=suite["critical_failures"],
        report=report,
        clean_manifest=clean_manifest,
        message=message,
    )
