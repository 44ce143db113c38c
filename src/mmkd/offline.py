"""Process-wide defaults that keep mmkd on this machine unless the user says otherwise.

Applied when mmkd is imported, before Prefect or Great Expectations read their settings.
Each variable is set only when the user has not set it, so any of them can be overridden.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    # No usage statistics from Prefect's server, Great Expectations or other tools.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    # MLflow reads DO_NOT_TRACK only when it is "true", so its own switch is set as well.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # No model downloads from the Hugging Face hub unless the user allows them.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Library loggers show up in Prefect's run logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "mmkd",
    # mmkd logs outside flow runs too (building data, the CLI); those stay local.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Prefect's temporary server takes 15-30 s to start on a small machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def apply_offline_defaults() -> None:
    """Set the variables of `OFFLINE_DEFAULTS` that are unset, and allow Prefect's
    on-demand local server when no API URL is configured."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
