"""The run report of a real audio-visual digits run: its page in Chromium, its numbers, mmkd report and compare."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect.client.orchestration import get_client

from mmkd.cli import main
from mmkd.errors import ConfigError
from mmkd.flows.pipeline import pipeline_flow
from mmkd.run_report import build_report, compare_runs

from conftest import write_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_avdigits, prefect_server):
    """A pipeline run on 120 real rows, report and MLflow included; returns (run folder, pipeline result)."""
    root = tmp_path_factory.mktemp("report")
    config = write_config(root / "configs", small_avdigits, tracking={"mlflow": True})
    result = pipeline_flow(str(config), str(root / "runs"))
    return root / "runs" / result["run_dir"].split("/")[-1], result


def report_numbers(run_dir) -> dict:
    return json.loads((run_dir / "report" / "report.json").read_text())


def embedded_images(page: str) -> list[Image.Image]:
    marker = "src='data:image/png;base64,"
    images = []
    for chunk in page.split(marker)[1:]:
        data = base64.b64decode(chunk.split("'", 1)[0])
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return images


def test_report_figures_load_in_chromium(finished_run):
    browser = pytest.importorskip("browser")
    if not browser.chromium_available():
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver")
    run_dir, _ = finished_run
    page = run_dir / "report" / "report.html"
    figures = sorted(p.stem for p in (run_dir / "report" / "figures").glob("*.png"))
    with browser.headless_chromium() as driver:
        driver.get(page.as_uri())
        states = driver.execute_script(
            "return Array.from(document.images).map(i => [i.closest('figure').id, i.complete, i.naturalWidth,"
            " i.naturalHeight]);"
        )
    assert sorted(state[0] for state in states) == figures
    for name, complete, width, height in states:
        assert complete, name
        assert width >= 300, name
        assert height >= 200, name


def test_report_figures_are_not_blank(finished_run):
    run_dir, _ = finished_run
    images = embedded_images((run_dir / "report" / "report.html").read_text())
    assert len(images) >= 10
    for image in images:
        pixels = np.asarray(image, dtype=np.float64)
        # More than the background: at least 2% of the pixels differ from the most common colour.
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        assert 1 - counts.max() / counts.sum() > 0.02


def test_report_lists_every_section(finished_run):
    run_dir, _ = finished_run
    page = (run_dir / "report" / "report.html").read_text()
    for title in ("Data", "Training", "Metrics", "Calibration", "Teacher and student agreement", "Size and latency",
                  "Embeddings and layer similarity", "What each modality contributes", "Attention between modalities"):
        assert f"<h2>{title}</h2>" in page, title
    for figure in ("curves-teacher", "curves-distill", "curves-finetune", "curves-baseline", "confusion",
                   "reliability", "disagreements", "latency", "embeddings-pca", "embeddings-tsne", "cka",
                   "modalities", "attention-teacher"):
        assert f"id='{figure}'" in page, figure


def test_metrics_table_matches_metrics_json(finished_run):
    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    page = (run_dir / "report" / "report.html").read_text()
    table = page.split("<h2>Metrics</h2>", 1)[1].split("</table>", 1)[0]
    cells = [row.split("</td><td>") for row in table.split("<tr><td>")[1:]]
    accuracy = {(cell[0], cell[1]): cell[3] for cell in cells}
    assert accuracy[("teacher", "PyTorch eager")] == f"{metrics['teacher']['test']['accuracy']:.4f}"
    assert accuracy[("student", "PyTorch eager")] == f"{metrics['student']['test']['accuracy']:.4f}"
    assert accuracy[("baseline", "PyTorch eager")] == f"{metrics['baseline']['test']['accuracy']:.4f}"
    assert accuracy[("student", "ONNX Runtime")] == f"{metrics['onnx']['test']['accuracy']:.4f}"


def test_confusion_matrix_agrees_with_test_accuracy(finished_run):
    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    confusion = np.array(report_numbers(run_dir)["confusion"]["student"])
    assert np.trace(confusion) / confusion.sum() == pytest.approx(metrics["student"]["test"]["accuracy"])


def test_curves_cover_every_stage_epoch(finished_run):
    run_dir, result = finished_run
    history = report_numbers(run_dir)["history"]
    assert len(history["teacher"]) == result["teacher"]["training"]["epochs_run"]
    assert len(history["distill"]) == result["student"]["training"]["distill"]["epochs_run"]
    assert {"hinton", "mse", "val_accuracy", "val_loss"} <= set(history["distill"][0])


def test_class_counts_sum_to_rows(finished_run):
    run_dir, _ = finished_run
    numbers = report_numbers(run_dir)
    counts = numbers["class_split_counts"]
    assert sum(sum(by_split.values()) for by_split in counts.values()) == 120
    assert sum(by_class["test"] for by_class in counts.values()) == numbers["test_rows"]


def test_pipeline_publishes_the_report_artifact(finished_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, result = finished_run
    with get_client(sync_client=True) as client:
        runs = [run.id for run in client.read_flow_runs() if run.parameters.get("run_dir") == result["run_dir"]]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs)))
    report = next(a for a in artifacts if a.key == "run-report")
    assert f"Folder: `{result['run_dir']}`" in report.data
    assert "## What each modality contributes" in report.data


def test_report_command_rebuilds_without_training(finished_run, tmp_path):
    run_dir, _ = finished_run
    checkpoints = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")}
    assert main(["report", str(run_dir), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    first = report_numbers(run_dir)
    assert again["confusion"] == first["confusion"]
    assert np.allclose(again["cka"]["matrix"], first["cka"]["matrix"], atol=1e-12)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")} == checkpoints


def test_compare_spreads_over_seeds(finished_run, tmp_path):
    run_dir, _ = finished_run
    # A second run of the same config, seed 1, whose student scored 0.1 more.
    other = tmp_path / "seed1"
    other.mkdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["run"]["seed"] = 1
    metrics["student"]["test"]["accuracy"] += 0.1
    (other / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(run_dir / "benchmark.json", other / "benchmark.json")

    report = compare_runs([run_dir, other])
    first, second = (run_dir, other)
    accuracies = [json.loads((folder / "metrics.json").read_text())["student"]["test"]["accuracy"]
                  for folder in (first, second)]
    mean, sd = np.mean(accuracies), np.std(accuracies, ddof=1)
    groups = report.sections[0].tables[1]
    assert groups.rows[0][1] == "2"
    assert groups.rows[0][3] == f"{mean:.4f} ± {sd:.4f}"
    assert len(report.sections[0].tables[0].rows) == 2


def test_report_spreads_over_sibling_seeds(finished_run, tmp_path):
    import yaml

    run_dir, _ = finished_run
    out = tmp_path / "runs"
    shutil.copytree(run_dir, out / run_dir.name)
    shutil.copytree(run_dir.parent / "cache", out / "cache")
    # A run of the same config with seed 1, whose student scored 0.2 less.
    sibling = out / "20991231T000000Z-tiny-seed1"
    sibling.mkdir()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["seed"] = 1
    (sibling / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    accuracies = [metrics["student"]["test"]["accuracy"], metrics["student"]["test"]["accuracy"] - 0.2]
    metrics["student"]["test"]["accuracy"] = accuracies[1]
    (sibling / "metrics.json").write_text(json.dumps(metrics))

    report = build_report(out / run_dir.name)
    assert sorted(report.numbers["seeds"]) == ["0", "1"]
    table = next(t for s in report.sections if s.title == "Metrics" for t in s.tables if t.columns[1] == "test accuracy"
                 and t.columns[0] == "model" and len(t.columns) == 3)
    student = next(row for row in table.rows if row[0] == "student")
    assert student[1] == f"{np.mean(accuracies):.4f} ± {np.std(accuracies, ddof=1):.4f}"


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"has no config.yaml"):
        build_report(tmp_path)


def event_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard event folder, read by TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_epoch_scalar(finished_run):
    from mmkd.checkpoints import load_checkpoint
    from mmkd.config import load_config

    run_dir, _ = finished_run
    config = load_config(run_dir / "config.yaml")
    _, student = load_checkpoint(run_dir / "student.pt", config)
    _, teacher = load_checkpoint(run_dir / "teacher.pt", config)
    histories = {"teacher": teacher["training"]["history"], "distill": student["training"]["distill"]["history"],
                 "finetune": student["training"]["finetune"]["history"]}
    for stage, history in histories.items():
        scalars = event_scalars(run_dir / "tensorboard" / stage)
        assert [step for step, _ in scalars["val/accuracy"]] == [record["epoch"] for record in history], stage
        assert [value for _, value in scalars["train/loss"]] == pytest.approx([r["loss"] for r in history]), stage
    assert {"train/hinton", "train/mse", "val/loss", "val/macro_f1", "time/epoch_seconds"} <= set(
        event_scalars(run_dir / "tensorboard" / "distill"))


def test_tensorboard_report_has_scores_and_figures(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scalars = event_scalars(run_dir / "tensorboard" / "report")
    assert scalars["test/student_accuracy"][0][1] == pytest.approx(metrics["student"]["test"]["accuracy"])
    images = EventAccumulator(str(run_dir / "tensorboard" / "report"), size_guidance={"images": 0}).Reload()
    figures = {p.stem for p in (run_dir / "report" / "figures").glob("*.png")}
    assert set(images.Tags()["images"]) == {f"report/{name}" for name in figures}


def test_projector_holds_both_embeddings(finished_run):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    from mmkd.checkpoints import load_checkpoint
    from mmkd.config import load_config
    from mmkd.data.loading import load_dataset
    from mmkd.training import predict

    run_dir, _ = finished_run
    folder = run_dir / "tensorboard" / "report"
    projector = text_format.Parse((folder / "projector_config.pbtxt").read_text(), ProjectorConfig())
    embeddings = {e.tensor_name.split(":")[0]: e for e in projector.embeddings}
    assert set(embeddings) == {"teacher_fused_embedding", "student_fused_embedding"}

    # The student's vectors are its fused embeddings of the test rows, computed here again.
    config = load_config(run_dir / "config.yaml")
    test = load_dataset(config.data).subset("test")
    student, _ = load_checkpoint(run_dir / "student.pt", config)
    _, expected = predict(student, test)
    stored = np.loadtxt(folder / embeddings["student_fused_embedding"].tensor_path, delimiter="\t", ndmin=2)
    assert np.allclose(stored, expected.numpy(), atol=1e-5)
    labels = (folder / embeddings["student_fused_embedding"].metadata_path).read_text().split()
    assert labels == [test.classes[i] for i in test.labels.tolist()]


def test_mlflow_store_holds_run_and_onnx(finished_run, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == run_dir.name]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_student_accuracy"] == pytest.approx(metrics["student"]["test"]["accuracy"])
    assert run.data.params["distill.train.epochs"] == "2"
    assert "student.onnx" in {f.path for f in client.list_artifacts(run.info.run_id)}
    copy = client.download_artifacts(run.info.run_id, "student.onnx", str(tmp_path))
    assert Path(copy).read_bytes() == (run_dir / "student.onnx").read_bytes()
