"""Great Expectations checks over the probe table of a multimodal manifest.

The probe table has one row per manifest row and flat columns (`row_number`, `id`,
`label`, `has_image`, `image_decodes`, `audio_sample_rate_hz`, ...). `build_checks` turns
the dataset's declared shape into `Check`s made of Great Expectations' built-in
expectations. `run_suite` validates a probe table with them through a File Data Context
inside the run folder, so Data Docs and stored results stay with the run.

NOTE: the Data Docs pages load Bootstrap, jQuery, Vega and Font Awesome from public CDNs
when opened in a browser. Without network access they show unstyled but readable tables.

Written against Great Expectations 1.24.1, whose column map expectations skip null values.
A probe column that is null where the modality is absent therefore needs no row condition,
but the image and audio checks also carry `row_condition` on `has_image`/`has_audio`.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.data_context import FileDataContext
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.expectation import Expectation
from great_expectations.expectations.metadata_types import FailureSeverity
from great_expectations.expectations.row_conditions import Column

from mmkd.config import LabelRule
from mmkd.errors import DataError

logger = logging.getLogger(__name__)

Severity = Literal["critical", "warning"]

# Names of the objects stored in the run's context. They are fixed, so a second run in the
# same folder replaces them instead of adding copies.
DATASOURCE_NAME = "mmkd_probes"
ASSET_NAME = "probe_table"
BATCH_DEFINITION_NAME = "whole_probe_table"
SUITE_NAME = "mmkd_manifest_checks"
VALIDATION_DEFINITION_NAME = "mmkd_manifest_validation"
CHECKPOINT_NAME = "mmkd_manifest_checkpoint"

# Probe columns that identify a failing row in the report.
ROW_KEY_COLUMNS = ("row_number", "id")

# Keys under each expectation's `meta` that tie a result back to its check.
META_CHECK_NAME = "mmkd_check"
META_SEVERITY = "mmkd_severity"


@dataclass(frozen=True)
class Check:
    """One named rule over the probe table.

    Attributes:
        name: Stable identifier used in reports, such as "audio_sample_rate".
        severity: "critical" or "warning". A failed critical check fails the
            validation, and a failed warning check is only reported.
        expectation: Great Expectations expectation that evaluates the rule.
        description: What the rule requires, in words for people reading the report.
    """

    name: str
    severity: Severity
    expectation: Expectation
    description: str

    def __post_init__(self) -> None:
        if self.severity not in ("critical", "warning"):
            raise ValueError(
                f"check {self.name!r} has invalid severity {self.severity!r}, "
                "expected 'critical' or 'warning'"
            )


def _modality_checks(
    modality: Literal["image", "audio"], severity: Severity
) -> list[Check]:
    """Build the exists, inside-root and decodes checks for rows that name a file of one modality."""
    present = Column(f"has_{modality}") == True  # noqa: E712 (builds a GX condition, not a comparison)
    flags = {
        "exists": "the file exists",
        "decodes": "the file decodes",
        "inside_root": "the path resolves inside the dataset root",
    }
    return [
        Check(
            name=f"{modality}_{flag}",
            severity=severity,
            expectation=gx.expectations.ExpectColumnValuesToBeInSet(
                column=f"{modality}_{flag}", value_set=[True], row_condition=present
            ),
            description=f"For every row with an {modality} file, {meaning}.",
        )
        for flag, meaning in flags.items()
    ]


def build_checks(
    *,
    classes: Sequence[str],
    sample_rate_hz: int | None,
    min_rows_per_class: int,
    image_size: tuple[int, int] | None = None,
    image_channels: int | None = None,
    image_modes: Sequence[str] | None = None,
    audio_channels: int | None = None,
    audio_encodings: Sequence[str] | None = None,
    max_audio_duration_s: float | None = None,
    splits: Sequence[str] | None = None,
    max_text_chars: int | None = None,
    max_text_tokens: int | None = None,
) -> list[Check]:
    """Build the checks of single rows, and the rows per class, for a probe table.

    Args:
        classes: Declared class labels. Every row's label must be one of them.
        sample_rate_hz: Sample rate every decoded recording must have, or None to
            accept any rate (when recordings are resampled).
        min_rows_per_class: Minimum number of rows for each declared class.
        image_size: Expected (width, height) of every decoded image in pixels, or None
            to accept any size.
        image_channels: Expected channel count of every decoded image, or None.
        image_modes: PIL modes that need no conversion; any other is a warning, or None.
        audio_channels: Expected channel count of every decoded recording, or None.
        audio_encodings: Accepted WAV sample encodings ("pcm16", ...), or None for any.
        max_audio_duration_s: Maximum recording duration in seconds that passes without
            a warning, or None to skip the duration check.
        splits: Allowed values of the `split` column, or None to skip the check.
        max_text_chars: Maximum text length in characters, or None for no limit.
        max_text_tokens: Maximum text length in whitespace-separated words, or None.

    Returns:
        Checks in report order, critical and warning mixed.

    Raises:
        ValueError: If `classes` is empty or has duplicates, or a number is out of range.
    """
    if not classes:
        raise ValueError("classes is empty. Declare at least one class label.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicate labels: {list(classes)}")
    if sample_rate_hz is not None and sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    if min_rows_per_class < 0:
        raise ValueError(f"min_rows_per_class must be 0 or more, got {min_rows_per_class}")

    expectations = gx.expectations
    has_image = Column("has_image") == True  # noqa: E712
    has_audio = Column("has_audio") == True  # noqa: E712
    checks = [
        Check(
            name="table_not_empty",
            severity="critical",
            expectation=expectations.ExpectTableRowCountToBeBetween(min_value=1),
            description="The manifest has at least one row.",
        ),
        Check(
            name="id_not_null",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToNotBeNull(column="id"),
            description="Every row has an id.",
        ),
        Check(
            name="id_unique",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToBeUnique(column="id"),
            description="No two rows share an id.",
        ),
        Check(
            name="label_not_null",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToNotBeNull(column="label"),
            description="Every row has a label.",
        ),
        Check(
            name="label_in_classes",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToBeInSet(
                column="label", value_set=list(classes)
            ),
            description=f"Every label is one of the declared classes {list(classes)}.",
        ),
    ]
    for label in classes:
        checks.append(
            Check(
                name=f"min_rows_per_class:{label}",
                severity="critical",
                expectation=expectations.ExpectTableRowCountToBeBetween(
                    min_value=min_rows_per_class, row_condition=Column("label") == label
                ),
                description=f"Class {label!r} has at least {min_rows_per_class} rows.",
            )
        )
    if splits is not None:
        checks.append(
            Check(
                name="split_in_set",
                severity="critical",
                expectation=expectations.ExpectColumnValuesToBeInSet(
                    column="split", value_set=list(splits)
                ),
                description=f"Every split is one of {list(splits)}.",
            )
        )

    checks.extend(_modality_checks("image", "critical"))
    if image_size is not None:
        width, height = image_size
        for column, pixels in (("image_width", width), ("image_height", height)):
            checks.append(
                Check(
                    name=column,
                    severity="critical",
                    expectation=expectations.ExpectColumnValuesToBeInSet(
                        column=column, value_set=[pixels], row_condition=has_image
                    ),
                    description=f"Every decoded image has {column.removeprefix('image_')} {pixels} px.",
                )
            )
    if image_channels is not None:
        checks.append(
            Check(
                name="image_channels",
                severity="critical",
                expectation=expectations.ExpectColumnValuesToBeInSet(
                    column="image_channels", value_set=[image_channels], row_condition=has_image
                ),
                description=f"Every decoded image has {image_channels} channel(s).",
            )
        )

    if image_modes is not None:
        checks.append(
            Check(
                name="image_mode",
                severity="warning",
                expectation=expectations.ExpectColumnValuesToBeInSet(
                    column="image_mode", value_set=list(image_modes), row_condition=has_image
                ),
                description=f"Every image is stored as {' or '.join(image_modes)}; others are converted when decoded.",
            )
        )

    checks.extend(_modality_checks("audio", "critical"))
    if sample_rate_hz is not None:
        checks.append(
            Check(
                name="audio_sample_rate",
                severity="critical",
                expectation=expectations.ExpectColumnValuesToBeInSet(
                    column="audio_sample_rate_hz", value_set=[sample_rate_hz], row_condition=has_audio
                ),
                description=f"Every decoded recording is sampled at {sample_rate_hz} Hz.",
            )
        )
    if audio_encodings is not None:
        checks.append(
            Check(
                name="audio_encoding",
                severity="critical",
                expectation=expectations.ExpectColumnValuesToBeInSet(
                    column="audio_encoding", value_set=list(audio_encodings), row_condition=has_audio
                ),
                description=f"Every recording is encoded as one of {', '.join(audio_encodings)}.",
            )
        )
    if audio_channels is not None:
        checks.append(
            Check(
                name="audio_channels",
                severity="critical",
                expectation=expectations.ExpectColumnValuesToBeInSet(
                    column="audio_channels", value_set=[audio_channels], row_condition=has_audio
                ),
                description=f"Every decoded recording has {audio_channels} channel(s).",
            )
        )
    checks.append(
        Check(
            name="audio_finite",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToBeBetween(
                column="audio_nonfinite", min_value=0, max_value=0, row_condition=has_audio
            ),
            description="No decoded recording contains NaN or infinite samples.",
        )
    )
    checks.append(
        Check(
            name="audio_not_silent",
            severity="warning",
            expectation=expectations.ExpectColumnValuesToBeInSet(
                column="audio_silent", value_set=[False], row_condition=has_audio
            ),
            description="No decoded recording is silent.",
        )
    )
    if max_audio_duration_s is not None:
        checks.append(
            Check(
                name="audio_duration",
                severity="warning",
                expectation=expectations.ExpectColumnValuesToBeBetween(
                    column="audio_duration_s",
                    min_value=0,
                    max_value=max_audio_duration_s,
                    strict_min=True,
                    row_condition=has_audio,
                ),
                description=f"Every decoded recording lasts more than 0 s and at most {max_audio_duration_s} s.",
            )
        )
    checks.append(
        Check(
            name="text_not_blank",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToBeInSet(
                column="text_blank", value_set=[False]
            ),
            description="No row has blank text.",
        )
    )
    checks.append(
        Check(
            name="text_utf8",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToBeInSet(column="text_utf8", value_set=[True]),
            description="Every text is valid UTF-8.",
        )
    )
    for column, limit, unit in (("text_chars", max_text_chars, "characters"), ("text_tokens", max_text_tokens, "words")):
        if limit is not None:
            checks.append(
                Check(
                    name=f"text_max_{column.removeprefix('text_')}",
                    severity="critical",
                    expectation=expectations.ExpectColumnValuesToBeBetween(column=column, max_value=limit),
                    description=f"Every text has at most {limit} {unit}.",
                )
            )
    return checks


def build_dataset_checks(
    *,
    classes: Sequence[str],
    split_fractions: Mapping[str, float],
    modalities: Sequence[str],
    min_rows_per_class_per_split: int,
    max_class_imbalance: float,
    split_fraction_tolerance: float,
    min_modality_coverage: float,
    label_rules: Sequence[LabelRule] = (),
) -> list[Check]:
    """Build the checks that compare rows, over the columns of `rows.add_dataset_columns`.

    Args:
        classes: Declared class labels.
        split_fractions: Expected share of the rows in each split. Every split with a
            share above 0 must have rows, and each of its classes at least
            `min_rows_per_class_per_split` of them.
        modalities: Modalities the models read; each needs `min_modality_coverage`.
        min_rows_per_class_per_split: Minimum rows of each class in each split.
        max_class_imbalance: Largest tolerated ratio of a split's largest class to its
            smallest (a warning).
        split_fraction_tolerance: Largest tolerated difference between a split's share
            of the rows and its expected share (a warning).
        min_modality_coverage: Smallest fraction of a split's rows that must have each
            modality.
        label_rules: Rules whose probe columns (`<name>`, `<name>_matched`) the table has.

    Returns:
        Checks in report order.
    """
    expectations = gx.expectations
    checks = [
        Check(
            name="has_modality",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToBeBetween(column="modality_count", min_value=1),
            description="Every row has at least one of image, audio and text.",
        ),
        *(
            Check(
                name=f"{modality}_in_one_split",
                severity="critical",
                expectation=expectations.ExpectColumnValuesToBeBetween(
                    column=f"{modality}_split_count", min_value=1, max_value=1
                ),
                description=f"No {modality} content appears in two splits (leakage).",
            )
            for modality in ("image", "audio")
        ),
        Check(
            name="content_one_label",
            severity="critical",
            expectation=expectations.ExpectColumnValuesToBeBetween(
                column="content_label_count", min_value=1, max_value=1
            ),
            description="Rows with the same content carry the same label.",
        ),
    ]
    for split, fraction in split_fractions.items():
        if fraction <= 0:
            continue
        in_split = Column("split") == split
        checks.append(
            Check(
                name=f"rows_in_split:{split}",
                severity="critical",
                expectation=expectations.ExpectTableRowCountToBeBetween(min_value=1, row_condition=in_split),
                description=f"Split {split!r} has rows.",
            )
        )
        checks.append(
            Check(
                name=f"split_share:{split}",
                severity="warning",
                expectation=expectations.ExpectColumnValuesToBeBetween(
                    column="split_share",
                    min_value=max(0.0, fraction - split_fraction_tolerance),
                    max_value=min(1.0, fraction + split_fraction_tolerance),
                    row_condition=in_split,
                ),
                description=(
                    f"Split {split!r} holds {fraction:.0%} of the rows, give or take {split_fraction_tolerance:.0%}."
                ),
            )
        )
        if min_rows_per_class_per_split > 0:
            for label in classes:
                checks.append(
                    Check(
                        name=f"min_rows_per_class_per_split:{split}:{label}",
                        severity="critical",
                        expectation=expectations.ExpectTableRowCountToBeBetween(
                            min_value=min_rows_per_class_per_split,
                            row_condition=in_split & (Column("label") == label),
                        ),
                        description=f"Split {split!r} has at least {min_rows_per_class_per_split} rows of class {label!r}.",
                    )
                )
    checks.append(
        Check(
            name="class_balance",
            severity="warning",
            expectation=expectations.ExpectColumnMaxToBeBetween(column="class_imbalance", max_value=max_class_imbalance),
            description=f"In every split, the largest class has at most {max_class_imbalance:g} times the rows of the smallest.",
        )
    )
    for modality in modalities:
        checks.append(
            Check(
                name=f"{modality}_coverage",
                severity="critical",
                expectation=expectations.ExpectColumnMinToBeBetween(
                    column=f"{modality}_coverage", min_value=min_modality_coverage
                ),
                description=f"In every split, at least {min_modality_coverage:.0%} of the rows have {modality}.",
            )
        )
    for rule in label_rules:
        name = rule.check_name
        if rule.pattern is not None:
            checks.append(
                Check(
                    name=f"{name}_matched",
                    severity="critical",
                    expectation=expectations.ExpectColumnValuesToBeInSet(column=f"{name}_matched", value_set=[True]),
                    description=f"Every {rule.column} cell matches the pattern {rule.pattern!r}.",
                )
            )
        checks.append(
            Check(
                name=name,
                severity="critical",
                expectation=expectations.ExpectColumnPairValuesToBeEqual(
                    column_A="label", column_B=name, ignore_row_if="either_value_is_missing"
                ),
                description=f"The label that {rule.column} implies equals the row's label.",
            )
        )
    return checks


def _build_suite(checks: Sequence[Check]) -> gx.ExpectationSuite:
    """Build an expectation suite whose expectations carry their check's name and severity."""
    names = [check.name for check in checks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate check names {duplicates}. Give each check its own name.")

    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for check in checks:
        # A copy without an id, because GX rejects an expectation that already belongs
        # to a suite, and the caller's checks may be run more than once.
        meta = {
            **(check.expectation.meta or {}),
            META_CHECK_NAME: check.name,
            META_SEVERITY: check.severity,
        }
        expectation = check.expectation.copy(
            deep=True,
            update={"id": None, "meta": meta, "severity": FailureSeverity(check.severity)},
        )
        suite.add_expectation(expectation)

    # GX 1.24.1 treats expectations that differ only in `meta` or `notes` as one and keeps the first.
    if len(suite.expectations) != len(checks):
        raise ValueError(
            "two checks have the same expectation and arguments, so Great Expectations "
            "would run only one of them. Remove one or change its arguments."
        )
    return suite


def _open_context(run_dir: Path) -> FileDataContext:
    """Open (or create) the File Data Context under `run_dir / "gx"` with analytics and progress bars off."""
    context = gx.get_context(mode="file", project_root_dir=run_dir)
    # mmkd sets GX_ANALYTICS_ENABLED=False only in its own process. The flag stored in
    # great_expectations.yml also covers anyone who opens this context later.
    context.enable_analytics(False)
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.variables.save()
    return context


def _file_url_to_path(url: str) -> Path:
    """Convert a file:// URL from Great Expectations to a local path."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise ValueError(f"Data Docs site URL {url!r} is not a file:// URL")
    return Path(urllib.request.url2pathname(parsed.path))


def _summarize_result(result: Any, check: Check, max_failing_rows: int) -> dict[str, Any]:
    """Reduce one expectation validation result to plain Python values, so it can be written as JSON."""
    details = dict(result.result or {})
    failing_rows = [
        {column: _to_builtin(entry.get(column)) for column in ROW_KEY_COLUMNS}
        for entry in details.get("partial_unexpected_index_list") or []
    ][:max_failing_rows]
    summary = {
        "name": check.name,
        "severity": check.severity,
        "description": check.description,
        "expectation_type": result.expectation_config.type,
        "column": result.expectation_config.kwargs.get("column"),
        "success": bool(result.success),
        "observed_value": details.get("observed_value"),
        "unexpected_count": details.get("unexpected_count"),
        "unexpected_percent": details.get("unexpected_percent"),
        "failing_rows": failing_rows,
        "exception": _exception_message(result.exception_info),
    }
    return {key: _to_builtin(value) for key, value in summary.items()}


def _exception_message(exception_info: dict[str, Any] | None) -> str | None:
    """Return the message of the exception GX caught while evaluating an expectation, if any.

    GX 1.24.1 stores one flat record when the expectation itself raised, but one record per
    metric, keyed by metric id, when computing a metric raised (a missing column, say).
    """
    if not exception_info:
        return None
    records = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    messages = {record["exception_message"] for record in records if record.get("raised_exception")}
    return "; ".join(sorted(messages)) or None


def _to_builtin(value: Any) -> Any:
    """Convert a numpy scalar to the matching Python scalar and return other values unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def run_suite(
    probes: pd.DataFrame,
    checks: list[Check],
    *,
    run_dir: Path,
    max_failing_rows: int = 20,
) -> dict[str, Any]:
    """Validate a probe table with `checks` and build Data Docs inside `run_dir`.

    Everything Great Expectations writes (config, stored suites, validation results and
    the Data Docs site) lands under `run_dir / "gx"`. Running again in the same folder
    replaces the stored suite and definitions and adds one more validation result. Data
    Docs re-renders every stored result, so each repeat in one folder takes a little longer.

    Args:
        probes: Probe table with at least the `row_number` and `id` columns.
        checks: Checks to run, for example from `build_checks`.
        run_dir: Folder of this validation run. It is created when missing.
        max_failing_rows: Most failing rows listed for each check.

    Returns:
        A dict of plain values. `success` is True when no critical check failed.
        `critical_failures` and `warning_failures` count failed checks. `checks` has one
        dict per check, in the given order, with name, severity, description, success,
        observed_value, unexpected_count, unexpected_percent, failing_rows (`row_number`
        and `id` pairs) and exception (the message when GX could not evaluate the check).
        `row_count` is the number of probe rows and `data_docs_index` the path of the
        Data Docs index.html.

    Raises:
        DataError: If the probe table lacks the `row_number` or `id` column.
        ValueError: If two checks share a name or an expectation.
    """
    missing = [column for column in ROW_KEY_COLUMNS if column not in probes.columns]
    if missing:
        raise DataError(
            f"probe table is missing column(s) {missing}. Columns {list(ROW_KEY_COLUMNS)} "
            "identify failing rows, so the probe step must write them."
        )
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    context = _open_context(run_dir)

    # Step 1: the data the checkpoint reads, an in-memory DataFrame passed at run time.
    datasource = context.data_sources.add_or_update_pandas(name=DATASOURCE_NAME)
    asset = datasource.add_dataframe_asset(name=ASSET_NAME)
    batch_definition = asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION_NAME)

    # Step 2: the suite, validation definition and checkpoint, replacing any from a previous run.
    suite = context.suites.add_or_update(_build_suite(checks))
    validation_definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=VALIDATION_DEFINITION_NAME, data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=CHECKPOINT_NAME,
            validation_definitions=[validation_definition],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": list(ROW_KEY_COLUMNS),
                "partial_unexpected_count": max_failing_rows,
                "return_unexpected_index_query": False,
            },
        )
    )

    # Step 3: validate, then render every stored result into the Data Docs site.
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": probes})
    site_urls = context.build_data_docs()
    data_docs_index = _file_url_to_path(site_urls["local_site"])

    # Step 4: one plain entry per check, in the order the checks were given.
    by_name = {check.name: check for check in checks}
    summaries: dict[str, dict[str, Any]] = {}
    for validation_result in checkpoint_result.run_results.values():
        for result in validation_result.results:
            name = result.expectation_config.meta[META_CHECK_NAME]
            summaries[name] = _summarize_result(result, by_name[name], max_failing_rows)
    ordered = [summaries[check.name] for check in checks]

    failed = [summary for summary in ordered if not summary["success"]]
    critical_failures = sum(summary["severity"] == "critical" for summary in failed)
    report = {
        "success": critical_failures == 0,
        "critical_failures": critical_failures,
        "warning_failures": len(failed) - critical_failures,
        "row_count": len(probes),
        "checks": ordered,
        "data_docs_index": str(data_docs_index),
    }
    logger.info(
        "Validated %d probe rows with %d checks in %.1f s: %d critical and %d warning failures, Data Docs at %s",
        len(probes),
        len(checks),
        time.perf_counter() - started,
        critical_failures,
        report["warning_failures"],
        data_docs_index,
    )
    for summary in failed:
        logger.info(
            "Check %s (%s) failed on %s rows, first rows: %s",
            summary["name"],
            summary["severity"],
            summary["unexpected_count"],
            summary["failing_rows"],
        )
    return report
