"""End to end through a real Prefect server: deploy, a worker, new rows, one retrain, a promotion decision.

Everything is read back through the Prefect API: the deployments `mmkd deploy` created,
the watcher's events, the retrain run the trigger started, its artifacts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from live_prefect import MMKD, listening_addresses, live_server, stop
from test_watch import append_rows

REPO = Path(__file__).resolve().parents[1]
WINDOW_S = 45
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("live-prefect")) as server:
        yield server


@pytest.fixture(scope="module")
def project(tmp_path_factory, small_avdigits):
    """A folder as a user would have it: config.yaml and a private copy of the real data."""
    from conftest import write_config

    folder = tmp_path_factory.mktemp("project")
    shutil.copytree(small_avdigits.parent, folder / "data")
    write_config(folder, Path("data/manifest.csv"))

    # The user's own copy of prefect.yaml, with the retrain window cut from 5 minutes to 45 s.
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text(encoding="utf-8"))
    retrain = next(d for d in spec["deployments"] if d["name"] == "retrain")
    retrain["triggers"][0].update(within=WINDOW_S, schedule_after=WINDOW_S)
    (folder / "deployments").mkdir()
    (folder / "deployments" / "prefect.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return folder


def api(live, call):
    """Return `call(client)` for a synchronous Prefect client of the live server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: live.api_url}), get_client(sync_client=True) as client:
        return call(client)


def flow_runs_of(live, deployment_name: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    return api(live, lambda client: client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))))


def flow_runs_named(live, flow_name: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return api(live, lambda client: client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))))


def wait_for_final(live, flow_run_id, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(live, lambda client: client.read_flow_run(flow_run_id))
        if run.state and run.state.type.value in FINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout:.0f} s")


def run_deployment_and_wait(live, name: str, timeout: float = 240) -> object:
    run = api(live, lambda client: client.create_flow_run_from_deployment(client.read_deployment_by_name(name).id))
    return wait_for_final(live, run.id, timeout)


def test_server_loopback_and_no_telemetry(live):
    assert listening_addresses(live.port) == {"127.0.0.1"}

    # `mmkd server` replaces itself with Prefect's server, whose environment is read here.
    command_line = Path(f"/proc/{live.process.pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    assert command_line[-6:] == ["server", "start", "--host", "127.0.0.1", "--port", str(live.port)]
    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{live.process.pid}/environ").read_bytes().decode().split("\0") if "=" in item)
    assert environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert environ["DO_NOT_TRACK"] == "1"
    assert environ["PREFECT_UI_API_URL"] == live.api_url


@pytest.fixture(scope="module")
def deployed(live, project):
    # No --file: mmkd deploy takes the project's deployments/prefect.yaml.
    result = subprocess.run([MMKD, "deploy"],
                            cwd=project, env=live.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def worker(live, project, deployed, tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([MMKD, "worker", "--name", "test-worker"], cwd=project,
                                   env=live.env(PREFECT_WORKER_QUERY_SECONDS="2"),
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    yield log
    stop(process)


def test_deploy_registers_every_deployment(live, deployed):
    deployments = api(live, lambda client: client.read_deployments())
    by_name = {d.name: d for d in deployments}
    assert set(by_name) == {"pipeline", "retrain", "watch", "validate", "teacher", "extract", "distill",
                            "finetune", "evaluate", "export", "benchmark", "report", "tune"}
    assert {d.work_pool_name for d in deployments} == {"mmkd-process"}
    assert by_name["pipeline"].schedules[0].active is False
    assert by_name["watch"].schedules[0].schedule.interval.total_seconds() == 300
    retrain = by_name["retrain"]
    assert retrain.global_concurrency_limit.limit == 1
    assert retrain.concurrency_options.collision_strategy.value == "CANCEL_NEW"

    automations = api(live, lambda client: client.read_automations())
    trigger = next(a.trigger for a in automations if a.actions[0].deployment_id == retrain.id)
    assert trigger.expect == {"mmkd.dataset.updated"}
    assert trigger.within.total_seconds() == WINDOW_S
    assert trigger.threshold == 1


def test_new_rows_start_one_retrain(live, project, worker):
    manifest = project / "data" / "manifest.csv"

    # The first tick stores the baseline fingerprint, so it emits no event and starts no retrain.
    baseline = run_deployment_and_wait(live, "watch/watch")
    assert baseline.state.type.value == "COMPLETED", worker.read_text()[-3000:]

    # Two quick appends, each seen by a tick within the window: two events, one retrain.
    append_rows(manifest, 3, prefix="first")
    assert run_deployment_and_wait(live, "watch/watch").state.type.value == "COMPLETED"
    append_rows(manifest, 2, prefix="second")
    assert run_deployment_and_wait(live, "watch/watch").state.type.value == "COMPLETED"

    from prefect.events.filters import EventFilter, EventNameFilter

    def updated_events() -> list:
        return api(live, lambda client: client.read_events(
            filter=EventFilter(event=EventNameFilter(name=["mmkd.dataset.updated"])), limit=50)).events

    deadline = time.monotonic() + 30  # the server stores events a moment after they arrive
    while len(events := updated_events()) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert sorted(e.payload["new_rows"] for e in events) == [2, 3]

    deadline = time.monotonic() + 60
    while not (runs := flow_runs_of(live, "retrain")) and time.monotonic() < deadline:
        time.sleep(2)
    assert len(runs) == 1, f"expected one retrain run, found {len(runs)}"

    # A retrain started by hand while that one runs is cancelled, not queued.
    deadline = time.monotonic() + 120
    while api(live, lambda client: client.read_flow_run(runs[0].id)).state.type.value in ("SCHEDULED", "PENDING"):
        assert time.monotonic() < deadline, "the retrain run did not start"
        time.sleep(1)
    extra = api(live, lambda client: client.create_flow_run_from_deployment(runs[0].deployment_id))
    # Rows added after the first pass validated its rows are trained by the same run, in a second pass.
    deadline = time.monotonic() + 120
    while not flow_runs_named(live, "teacher"):
        assert time.monotonic() < deadline, "the first pass did not reach its teacher stage"
        time.sleep(1)
    append_rows(manifest, 2, prefix="third")

    retrain = wait_for_final(live, runs[0].id, timeout=420)
    assert retrain.state.type.value == "COMPLETED", worker.read_text()[-5000:]
    assert wait_for_final(live, extra.id, timeout=120).state.type.value == "CANCELLED"
    time.sleep(15)  # a second triggered run would have been created by now
    assert [run.id for run in flow_runs_of(live, "retrain") if run.id != extra.id] == [retrain.id]

    # The first event's payload reached the flow's parameters.
    assert Path(retrain.parameters["manifest"]) == manifest.resolve()
    assert retrain.parameters["dataset"] == "data"
    assert int(retrain.parameters["new_rows"]) == 3

    # The decision is recorded in the registry and as an artifact of the run.
    history = [json.loads(line) for line in (project / "runs" / "registry" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    assert history[0]["promoted"] is True
    assert history[0]["reason"] == "no model has been promoted yet"
    assert history[1]["current"] == history[0]["candidate"]
    first_pass = json.loads((Path(history[0]["candidate_run_dir"]) / "metrics.json").read_text())
    assert first_pass["validation"]["rows_in"] == 125
    metrics = json.loads((Path(history[1]["candidate_run_dir"]) / "metrics.json").read_text())
    assert metrics["validation"]["rows_in"] == 127

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    decision = api(live, lambda client: client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["promotion-decision"]))))
    assert len(decision) == 2
    assert any(artifact.data.startswith("## Student promoted") for artifact in decision)

    # The pipeline run inside the retrain shows its metrics table in the Prefect UI.
    pipeline_runs = flow_runs_named(live, "pipeline")
    assert len(pipeline_runs) == 2
    last_pass = max(pipeline_runs, key=lambda run: run.start_time)
    check_metrics_table_in_ui(live, last_pass.id, metrics)

    # mmkd's own log lines reach the server from the worker's flow run.
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = api(live, lambda client: client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[last_pass.id]))))
    assert any(log.message.startswith("Test accuracy: teacher") for log in logs)
    teacher_runs = flow_runs_named(live, "teacher")
    teacher_logs = api(live, lambda client: client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[teacher_runs[0].id]))))
    assert any(log.name == "mmkd.training" and log.message.startswith("teacher epoch 1/2") for log in teacher_logs)


def test_serve_refuses_deployments_a_worker_runs(live, project, deployed):
    result = subprocess.run([MMKD, "serve"], cwd=project, env=live.env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "are deployed for a worker (by `mmkd deploy`)" in result.stderr
    assert "prefect deployment delete" in result.stderr


def check_metrics_table_in_ui(live, flow_run_id, metrics: dict) -> None:
    """Open the flow run's page in headless Chromium and find the metrics table artifact on it."""
    browser = pytest.importorskip("browser")
    if not browser.chromium_available():
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver")
    screenshot = browser.screenshot_folder() / "prefect-ui-metrics-artifact.png"
    screenshot.unlink(missing_ok=True)
    with browser.headless_chromium() as driver:
        browser.find_artifact_on_flow_run_page(
            driver, live.ui_url, str(flow_run_id), artifact_key="metrics",
            expected_cells=["teacher", "baseline", "ONNX Runtime", str(metrics["teacher"]["params"]),
                            str(metrics["student"]["params"])],
            screenshot_path=screenshot,
        )
    width, height = browser.png_size(screenshot)
    assert width >= 800, f"the screenshot {screenshot} is {width}x{height}"
    assert height >= 600, f"the screenshot {screenshot} is {width}x{height}"
