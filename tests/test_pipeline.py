"""The whole pipeline end to end on a slice of the real data, under the Prefect test server."""

import json

from prefect.client.orchestration import get_client

from mmkd.flows.pipeline import pipeline_flow

from conftest import TINY_CONFIG, write_config

STAGES = {"validate", "teacher", "extract", "distill", "finetune", "evaluate", "export", "benchmark", "report", "promote"}


def test_pipeline_runs_every_stage_as_a_subflow_and_writes_the_run_folder(tmp_path, small_avdigits, prefect_server):
    config = write_config(tmp_path / "configs", small_avdigits)
    result = pipeline_flow(str(config), str(tmp_path / "runs"), seed=3)

    run_dir = tmp_path / "runs" / result["run_dir"].split("/")[-1]
    for name in ("config.yaml", "teacher.pt", "student.pt", "baseline.pt", "student.onnx", "metrics.json", "benchmark.json"):
        assert (run_dir / name).is_file(), name
    assert "seed: 3" in (run_dir / "config.yaml").read_text()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for role in ("teacher", "student", "baseline"):
        assert metrics[role]["params"] > 0
        assert 0.0 <= metrics[role]["test"]["accuracy"] <= 1.0
    assert metrics["student"]["params"] * 10 <= metrics["teacher"]["params"]
    assert metrics["baseline"]["params"] == metrics["student"]["params"]
    assert metrics["onnx"]["test"]["accuracy"] == metrics["student"]["test"]["accuracy"]
    assert metrics["onnx"]["parity_max_abs_diff"] <= 1e-4

    # The student ships as a Triton model repository with its model card.
    repository = run_dir / "model_repository" / "student"
    assert (repository / "1" / "model.onnx").read_bytes() == (run_dir / "student.onnx").read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (repository / "config.pbtxt").read_text()
    card = (repository / "model_card.md").read_text()
    assert f"| student | ONNX Runtime | {metrics['student']['params']:,} | {metrics['onnx']['test']['accuracy']:.4f} |" in card
    assert metrics["run"]["data_fingerprint"] in card

    benchmark = json.loads((run_dir / "benchmark.json").read_text())
    assert {(r["model"], r["engine"], r["batch_size"]) for r in benchmark if r["model"] in ("teacher", "student")} == {
        (m, e, b) for m in ("teacher", "student") for e in ("onnxruntime", "pytorch-eager") for b in (1, 4)
    }

    # The Prefect server saw the pipeline and each stage as its own completed flow run.
    # Other tests share the server, so only the stage runs of this run folder count.
    with get_client(sync_client=True) as client:
        runs = [run for run in client.read_flow_runs() if run.parameters.get("run_dir") == result["run_dir"]]
        names = {client.read_flow(run.flow_id).name: run for run in runs}
        parents = set()
        for run in runs:
            parent_run = client.read_flow_run(client.read_task_run(run.parent_task_run_id).flow_run_id)
            parents.add(client.read_flow(parent_run.flow_id).name)
    assert set(names) == STAGES
    for stage in STAGES:
        assert names[stage].state.is_completed()
        assert "mmkd" in names[stage].tags
    assert parents == {"pipeline"}


def test_second_run_with_the_same_teacher_reuses_every_cached_output(tmp_path, small_avdigits, prefect_server):
    config = write_config(tmp_path / "configs", small_avdigits)
    first = pipeline_flow(str(config), str(tmp_path / "runs"))
    assert first["features"]["computed"] == 120

    # The same data and the first run's teacher: nothing goes through the teacher again.
    teacher = f"{first['run_dir']}/teacher.pt"
    reuse = write_config(tmp_path / "reuse", small_avdigits, teacher={**TINY_CONFIG["teacher"], "checkpoint": teacher})
    second = pipeline_flow(str(reuse), str(tmp_path / "runs"))
    assert second["features"]["computed"] == 0
    assert second["features"]["reused"] == 120
    assert second["teacher"]["fingerprint"] == first["teacher"]["fingerprint"]
    assert second["teacher"]["test"]["accuracy"] == first["teacher"]["test"]["accuracy"]


def broken_copy(tmp_path, small_avdigits):
    """A copy of the small data with one recording deleted and one image replaced by text."""
    import shutil

    import pandas as pd

    data = tmp_path / "data"
    shutil.copytree(small_avdigits.parent, data)
    frame = pd.read_csv(data / "manifest.csv", dtype=str)
    (data / frame.loc[3, "audio"]).unlink()
    (data / frame.loc[7, "image"]).write_text("not an image", encoding="utf-8")
    return data / "manifest.csv", [frame.loc[3, "id"], frame.loc[7, "id"]]


def test_pipeline_stops_on_bad_rows_naming_each(tmp_path, small_avdigits, prefect_server):
    import pytest

    from mmkd.errors import DataError

    manifest, broken_ids = broken_copy(tmp_path, small_avdigits)
    config = write_config(tmp_path / "configs", manifest)
    with pytest.raises(DataError, match="Validation failed") as info:
        pipeline_flow(str(config), str(tmp_path / "runs"))
    for row_id in broken_ids:
        assert f"row {row_id!r}" in str(info.value)


def test_pipeline_with_quarantine_trains_on_the_rows_kept(tmp_path, small_avdigits, prefect_server):
    manifest, broken_ids = broken_copy(tmp_path, small_avdigits)
    config = write_config(tmp_path / "configs", manifest,
                          validation={"on_failure": "quarantine", "max_quarantined_fraction": 0.1})
    result = pipeline_flow(str(config), str(tmp_path / "runs"))
    validation = result["validation"]
    assert (validation["rows_in"], validation["rows_kept"], validation["rows_quarantined"]) == (120, 118, 2)
    assert result["features"]["rows"] == 118
    quarantine = (tmp_path / "runs" / result["run_dir"].split("/")[-1] / "validation" / "quarantine.csv").read_text()
    for row_id in broken_ids:
        assert row_id in quarantine

    # A rerun reuses the validation and still trains on the rows kept, read from its own folder.
    again = pipeline_flow(str(config), str(tmp_path / "runs"))
    assert "validate" in again["reused"]
    assert again["features"]["rows"] == 118
    again_config = (tmp_path / "runs" / again["run_dir"].split("/")[-1] / "config.yaml").read_text()
    assert f"{again['run_dir']}/validation/manifest.clean.csv" in again_config


def artifacts_of_runs(client, flow_run_ids) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids))))


def test_pipeline_rerun_reuses_stages_and_publishes(tmp_path, small_avdigits, prefect_server):
    out = tmp_path / "runs"
    config = write_config(tmp_path / "configs", small_avdigits)
    first = pipeline_flow(str(config), str(out))
    assert first["reused"] == {}

    second = pipeline_flow(str(config), str(out))
    cached = {"validate", "teacher", "distill", "finetune", "evaluate", "export", "benchmark"}
    assert second["reused"] == {stage: first["run_dir"] for stage in cached}
    assert (out / "latest").resolve() == (out / second["run_dir"].split("/")[-1]).resolve()
    for role in ("teacher", "student", "baseline", "onnx"):
        assert second[role]["test"] == first[role]["test"]
    second_dir = out / second["run_dir"].split("/")[-1]
    for name in ("teacher.pt", "student.pt", "student.onnx", "benchmark.md", "validation/validation.json"):
        assert (second_dir / name).read_bytes() == (out / first["run_dir"].split("/")[-1] / name).read_bytes()
    assert second["validation"]["report"] == str(second_dir / "validation" / "validation.json")

    # A changed benchmark section runs the benchmark again and reuses everything before it.
    timing = write_config(tmp_path / "timing", small_avdigits, benchmark={"iterations": 6})
    third = pipeline_flow(str(timing), str(out))
    assert set(third["reused"]) == cached - {"benchmark"}

    with get_client(sync_client=True) as client:
        pipeline_runs = [run for run in client.read_flow_runs() if run.parameters.get("out_dir") == str(out)]
        first_run = min(pipeline_runs, key=lambda run: run.start_time)
        stage_runs = [run.id for run in client.read_flow_runs() if run.parameters.get("run_dir") == first["run_dir"]]
        published = artifacts_of_runs(client, [first_run.id])
        progress = artifacts_of_runs(client, stage_runs)

    # The metrics table has the same figures as metrics.json.
    table = json.loads(next(a for a in published if a.key == "metrics").data)
    rows = {(row["model"], row["engine"]): row for row in table}
    assert rows[("teacher", "PyTorch eager")]["test_accuracy"] == round(first["teacher"]["test"]["accuracy"], 4)
    assert rows[("student", "ONNX Runtime")]["test_accuracy"] == round(first["onnx"]["test"]["accuracy"], 4)
    assert rows[("student", "PyTorch eager")]["parameters"] == first["student"]["params"]
    summary = next(a for a in published if a.key == "run-summary").data
    assert first["run_dir"] in summary
    assert "Data Docs" in summary

    # One progress bar per training stage, full at the end.
    bars = {a.description.split(":")[0]: a.data for a in progress if a.type == "progress"}
    assert bars == {"teacher": 100.0, "distill": 100.0, "finetune": 100.0, "baseline": 100.0}
