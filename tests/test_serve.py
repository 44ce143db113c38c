"""`mmkd serve` registers the deployments of prefect.yaml and runs their flow runs without a worker."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from live_prefect import MMKD, live_server, stop
from test_retrain_e2e import REPO, api, wait_for_final


def test_serve_runs_a_deployment_without_a_worker(tmp_path, small_avdigits):
    from conftest import write_config

    shutil.copytree(small_avdigits.parent, tmp_path / "data")
    write_config(tmp_path, Path("data/manifest.csv"))
    with live_server(tmp_path / "server") as live:
        log = tmp_path / "serve.log"
        with log.open("wb") as log_file:
            serving = subprocess.Popen([MMKD, "serve", "--file", str(REPO / "deployments" / "prefect.yaml")],
                                       cwd=tmp_path, env=live.env(), stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while len(deployments := api(live, lambda client: client.read_deployments())) < 11:
                assert serving.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            assert {d.work_pool_name for d in deployments} == {None}  # served, not taken by a pool's worker

            watch = next(d for d in deployments if d.name == "watch")
            run = api(live, lambda client: client.create_flow_run_from_deployment(watch.id))
            finished = wait_for_final(live, run.id, timeout=180)
            assert finished.state.type.value == "COMPLETED", log.read_text()[-3000:]
            assert (tmp_path / "watch-state" / "data.json").is_file()
        finally:
            stop(serving)
