"""Importing mmkd turns off usage statistics and hub downloads unless the user set otherwise."""

import json
import os
import subprocess
import sys

PROBE = """
import json, os
import mmkd
from prefect.settings import get_current_settings
settings = get_current_settings()
print(json.dumps({
    "prefect_analytics": settings.server.analytics_enabled,
    "ephemeral_server": settings.server.ephemeral.enabled,
    "gx": os.environ["GX_ANALYTICS_ENABLED"],
    "hf_offline": os.environ["HF_HUB_OFFLINE"],
    "extra_loggers": os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"],
}))
"""


def probe(env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GX_", "HF_", "DO_NOT_TRACK"))}
    env["PREFECT_HOME"] = os.environ["PREFECT_HOME"]
    env.update(env_changes)
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_turns_off_telemetry_and_downloads_by_default():
    seen = probe({})
    assert seen["prefect_analytics"] is False
    assert seen["gx"] == "False"
    assert seen["hf_offline"] == "1"
    assert seen["ephemeral_server"] is True
    assert seen["extra_loggers"] == "mmkd"


def test_user_settings_win_over_the_defaults():
    seen = probe({"HF_HUB_OFFLINE": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "true"})
    assert seen["hf_offline"] == "0"
    assert seen["prefect_analytics"] is True
