"""Teacher extraction spread over Prefect's Dask task runner, against one process."""

from __future__ import annotations

import shutil

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from mmkd.data.loading import load_dataset
from mmkd.errors import ConfigError
from mmkd.features import FeatureStore
from mmkd.flows.extract import dask_task_runner, extract_flow
from mmkd.flows.teacher import teacher_flow

from conftest import prepared_run


def run_folder(root, small_avdigits, name: str, **extract) -> tuple:
    """Write a run folder whose config has `extract` settings and its own feature store; return (folder, config)."""
    return prepared_run(root, small_avdigits, name, extract={"shard_rows": 50, **extract},
                        feature_store=str(root / f"store-{name}"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_avdigits, prefect_server):
    """A trained teacher and its outputs extracted in the flow's own process."""
    root = tmp_path_factory.mktemp("spread")
    folder, config = run_folder(root, small_avdigits, "one")
    teacher_flow.fn(str(folder))
    result = extract_flow(str(folder))
    return root, folder, config, result


def outputs_of(config, result) -> dict[str, torch.Tensor]:
    """Every stored output of every row of the run's data, read back from the store."""
    store = FeatureStore(config.feature_store, result["folder"].rsplit("/", 1)[-1].split("-")[0])
    return store.get_outputs(load_dataset(config.data).keys)


def task_run_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(run.name.rsplit("-", 1)[0] for run in runs if run.state.is_completed())


def test_two_dask_workers_store_the_same_outputs(one_process, small_avdigits):
    root, one_folder, one_config, one_result = one_process
    folder, config = run_folder(root, small_avdigits, "dask", workers=2)
    shutil.copy(one_folder / "teacher.pt", folder / "teacher.pt")

    state = extract_flow(str(folder), return_state=True)
    result = state.result()

    # 120 rows over 2 workers, at most 50 per shard: parts of 50, 50 and 20, one task each.
    assert result["computed"] == 120
    assert result["shards"] == 3
    assert task_run_names(state.state_details.flow_run_id) == ["decode-dataset"] + ["extract-teacher-part"] * 3
    expected = outputs_of(one_config, one_result)
    spread = outputs_of(config, result)
    assert set(spread) == set(expected)
    for name in expected:
        assert torch.allclose(spread[name], expected[name], atol=1e-6), name


def test_workers_leave_fingerprints_and_stage_keys_alone(one_process):
    from mmkd.stage_cache import stage_keys

    _, _, config, _ = one_process
    extract = config.extract.model_copy(update={"workers": 8, "cluster_address": "tcp://127.0.0.1:8786"})
    spread = config.model_copy(update={"extract": extract})
    assert spread.fingerprint() == config.fingerprint()
    assert stage_keys(spread, "data") == stage_keys(config, "data")


def test_missing_prefect_dask_names_the_extra(one_process, monkeypatch):
    import sys

    _, _, config, _ = one_process
    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    with pytest.raises(ConfigError, match=r"pip install 'mmkd\[dask\]'"):
        dask_task_runner(config.extract.model_copy(update={"workers": 2}))
