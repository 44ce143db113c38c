"""deployments/prefect.yaml names flows that exist, with parameters they accept."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from prefect import Flow

DEPLOYMENTS = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml").read_text(encoding="utf-8")
)["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_entrypoint_is_a_flow_taking_its_parameters(deployment):
    module_name, _, attribute = deployment["entrypoint"].partition(":")
    flow = getattr(importlib.import_module(module_name), attribute)
    assert isinstance(flow, Flow)
    accepted = inspect.signature(flow.fn).parameters
    assert set(deployment.get("parameters", {})) <= set(accepted)
    assert deployment["work_pool"]["name"] == "mmkd-process"


def test_watch_schedule_is_present_and_off():
    watch = next(d for d in DEPLOYMENTS if d["name"] == "watch")
    assert watch["schedules"] == [{"interval": 300, "active": False}]
