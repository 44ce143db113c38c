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


def test_every_flow_of_the_package_has_a_deployment():
    import pkgutil

    import mmkd.flows

    flows = set()
    for module_info in pkgutil.iter_modules(mmkd.flows.__path__):
        module = importlib.import_module(f"mmkd.flows.{module_info.name}")
        flows |= {f"{module.__name__}:{name}" for name, value in vars(module).items()
                  if isinstance(value, Flow) and value.__module__ == module.__name__}
    # promote runs inside retrain; it has no deployment of its own.
    assert flows - {"mmkd.flows.promote:promote_flow"} == {d["entrypoint"] for d in DEPLOYMENTS}


def test_pipeline_has_an_inactive_nightly_schedule():
    pipeline = next(d for d in DEPLOYMENTS if d["name"] == "pipeline")
    assert pipeline["schedules"] == [{"cron": "0 2 * * *", "active": False}]


def test_retrain_trigger_parameters_exist_on_flow():
    from mmkd.flows.retrain import retrain_flow

    retrain = next(d for d in DEPLOYMENTS if d["name"] == "retrain")
    trigger = retrain["triggers"][0]
    assert trigger["expect"] == ["mmkd.dataset.updated"]
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert set(trigger["parameters"]) <= set(inspect.signature(retrain_flow.fn).parameters)
    assert retrain["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


def test_io_tasks_retry_and_training_tasks_never():
    from mmkd.flows._common import decode_dataset
    from mmkd.flows.distill import distill_student
    from mmkd.flows.evaluate import train_baseline
    from mmkd.flows.teacher import train_teacher

    assert decode_dataset.retries == 2
    assert "io" in decode_dataset.tags
    for training in (train_teacher, distill_student, train_baseline):
        assert training.retries == 0
        assert "training" in training.tags
        assert training.description


def test_decode_retries_os_errors_but_not_broken_rows():
    from prefect.states import Failed

    from mmkd.errors import DataError
    from mmkd.flows._common import _is_transient_io_error, decode_dataset

    assert decode_dataset.retry_condition_fn is _is_transient_io_error
    assert _is_transient_io_error(None, None, Failed(data=OSError("stale NFS handle"))) is True
    assert _is_transient_io_error(None, None, Failed(data=DataError("row 'a-1': missing file"))) is False
