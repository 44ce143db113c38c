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
from mmkd.errors import ConfigError
from mmkd.manifest import SPLITS, label_order, read_manifest, write_manifest
from mmkd.runs import atomic_write, atomic_write_json
from mmkd.validation.gx_suite import Check, build_checks, build_dataset_checks, run_suite
from mmkd.validation.probes import probe_manifest, write_probe_table
from mmkd.validation.rows import Problem, add_dataset_columns, implied_labels, row_problems

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


def _checks(config: RunConfig, classes: list[str]) -> list[Check]:
    """Build the single-row and the dataset checks that the config sets."""
    data, policy = config.data, config.validation
    audio = data.audio
    return build_checks(
        classes=classes,
        sample_rate_hz=None if audio.resample else audio.sample_rate_hz,
        min_rows_per_class=policy.min_rows_per_class,
        image_modes=["L"] if data.image.channels == 1 else ["RGB"],
        audio_channels=None if audio.downmix else 1,
        audio_encodings=audio.encodings,
        splits=SPLITS,
        max_text_chars=data.text.max_chars,
        max_text_tokens=data.text.max_tokens,
    ) + build_dataset_checks(
        classes=classes,
        split_fractions=data.split_fractions,
        modalities=data.modalities,
        min_rows_per_class_per_split=policy.min_rows_per_class_per_split,
        max_class_imbalance=policy.max_class_imbalance,
        split_fraction_tolerance=policy.split_fraction_tolerance,
        min_modality_coverage=policy.min_modality_coverage,
        label_rules=policy.label_rules,
    )


def _add_label_rule_columns(probes: pd.DataFrame, frame: pd.DataFrame, config: RunConfig) -> pd.DataFrame:
    """Add, for each label rule, the cell it reads, the label it implies and whether it matched."""
    table = probes.copy()
    for i, rule in enumerate(config.validation.label_rules):
        if rule.column not in frame.columns:
            raise ConfigError(
                f"validation.label_rules[{i}].column: {rule.column!r} is not a column of the manifest "
                f"{config.data.manifest}. Its columns: {', '.join(map(str, frame.columns))}."
            )
        cells = frame[rule.column].reset_index(drop=True)
        implied, matched = implied_labels(cells, rule)
        table[f"{rule.check_name}_cell"] = cells.map(lambda v: None if pd.isna(v) else str(v))
        table[rule.check_name] = implied
        table[f"{rule.check_name}_matched"] = matched
    return table


def _observed(check: dict) -> str:
    """Describe what a failed check found: its observed value, or how many rows failed it."""
    if check["observed_value"] is not None:
        return f"observed {check['observed_value']}"
    if check["unexpected_count"] is not None:
        return f"{check['unexpected_count']} rows"
    return check["exception"] or "failed"


def _write_quarantine(path: Path, problems: dict[int, list[Problem]]) -> None:
    def write(tmp: Path) -> None:
        # Cells that were not UTF-8 in the manifest are written with backslash escapes.
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(QUARANTINE_COLUMNS)
            for row_number, found in problems.items():
                writer.writerow([
                    found[0].row_id, row_number,
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
    manifest = read_manifest(
        data.manifest, modalities=data.modalities, split_fractions=data.split_fractions, root=data.root, bad_rows="keep"
    )
    labels = manifest.frame["label"].dropna().astype(str)
    classes = list(data.classes) if data.classes is not None else sorted(set(labels), key=label_order)

    # Probe every row, streaming the records to disk, then add the cross-row columns.
    probes_path = out_dir / "probes.csv"
    rows_in = write_probe_table(probe_manifest(manifest, max_image_pixels=data.image.max_pixels), probes_path)
    raw = pd.read_csv(
        probes_path,
        dtype={"id": object, "label": object, "split": object},
        keep_default_na=False,
        na_values=[""],
        encoding_errors="surrogateescape",
    )
    raw = _add_label_rule_columns(raw, manifest.frame, config)
    probes = add_dataset_columns(raw, classes=classes, modalities=data.modalities)

    # Per-row reasons decide which rows are set aside.
    problems: dict[int, list[Problem]] = {}
    for record in probes.to_dict("records"):
        found = row_problems(record, classes=classes, data=data, label_rules=policy.label_rules)
        if found:
            problems[int(record["row_number"])] = found
    quarantined = set(problems)

    # The Great Expectations suite runs over the rows that stay, with the cross-row
    # columns computed again among them.
    if policy.on_failure == "quarantine":
        kept_raw = raw[~raw["row_number"].isin(quarantined)]
        kept_probes = add_dataset_columns(kept_raw, classes=classes, modalities=data.modalities)
    else:
        kept_probes = probes
    suite = run_suite(kept_probes.reset_index(drop=True), _checks(config, classes), run_dir=out_dir)

    failed = [c for c in suite["checks"] if c["severity"] == "critical" and not c["success"]]
    failed_text = ", ".join(f"{c['name']} ({_observed(c)})" for c in failed[:10])
    failed_text += f" and {len(failed) - 10} more" if len(failed) > 10 else ""
    fraction = len(quarantined) / rows_in if rows_in else 0.0
    rows_quarantined = len(quarantined) if policy.on_failure == "quarantine" else 0
    if policy.on_failure == "stop":
        passed = not problems and suite["critical_failures"] == 0
        message = f"{len(problems)} of {rows_in} rows have critical problems"
        if failed:
            message += f"; {len(failed)} critical checks failed: {failed_text}"
        rows_kept = rows_in
    else:
        passed = fraction <= policy.max_quarantined_fraction and suite["critical_failures"] == 0
        message = (f"{len(quarantined)} of {rows_in} rows set aside ({fraction:.1%}, limit "
                   f"{policy.max_quarantined_fraction:.1%}); {len(failed)} critical checks failed on the rest")
        if failed:
            message += f": {failed_text}"
        rows_kept = rows_in - rows_quarantined
    if passed:
        message = f"{rows_kept} of {rows_in} rows kept"

    # Outputs: the quarantine list, the clean manifest and the report.
    _write_quarantine(out_dir / "quarantine.csv", problems)
    clean_manifest = None
    if passed:
        numbers = pd.Series(range(1, len(manifest.frame) + 1), index=manifest.frame.index)
        clean = manifest.frame[~numbers.isin(quarantined)] if policy.on_failure == "quarantine" else manifest.frame
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
