"""Each stage flow through `.fn()` on a small slice of the real data, in pipeline order."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mmkd.checkpoints import load_checkpoint
from mmkd.config import load_config, save_config
from mmkd.data.loading import load_dataset
from mmkd.errors import DataError
from mmkd.features import FeatureStore
from mmkd.flows.benchmark import benchmark_flow
from mmkd.flows.distill import distill_flow
from mmkd.flows.evaluate import evaluate_flow
from mmkd.flows.export import export_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.models.multimodal import count_parameters

from conftest import onnx_probabilities, predict_without_torch, write_config

BENCHMARK_KEYS = {"model", "engine", "provider", "batch_size", "audio_samples", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "peak_mib"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_avdigits, prefect_server):
    """A run folder holding the resolved tiny config, as the pipeline flow would leave it."""
    root = tmp_path_factory.mktemp("runs")
    config = load_config(write_config(root / "configs", small_avdigits))
    folder = root / "run-1"
    folder.mkdir()
    save_config(config, folder / "config.yaml")
    return folder


def accuracy_of(checkpoint, run_dir, split="test"):
    config = load_config(run_dir / "config.yaml")
    dataset = load_dataset(config.data).subset(split)
    model, _ = load_checkpoint(checkpoint, config)
    with torch.no_grad():
        logits, _ = model(*dataset.model_inputs())
    return float((logits.argmax(1) == dataset.labels).float().mean()), logits, dataset


def test_teacher_flow_trains_and_saves_a_checkpoint_with_its_fingerprint(run_dir):
    result = teacher_flow.fn(str(run_dir))
    model, metadata = load_checkpoint(run_dir / "teacher.pt", load_config(run_dir / "config.yaml"))
    assert result["params"] == count_parameters(model) == metadata["params"]
    assert result["fingerprint"] == metadata["fingerprint"]
    assert metadata["classes"] == [str(d) for d in range(10)]
    assert result["val"]["accuracy"] == pytest.approx(accuracy_of(run_dir / "teacher.pt", run_dir, "val")[0])


def test_extract_flow_stores_every_row_once_and_reuses_them_on_a_second_run(run_dir):
    first = extract_flow.fn(str(run_dir))
    assert first["rows"] == 120
    assert first["computed"] == 120
    assert first["reused"] == 0
    second = extract_flow.fn(str(run_dir))
    assert second["computed"] == 0
    assert second["reused"] == 120

    # The stored logits are the teacher's own outputs for those rows.
    config = load_config(run_dir / "config.yaml")
    teacher, metadata = load_checkpoint(run_dir / "teacher.pt", config)
    dataset = load_dataset(config.data)
    store = FeatureStore(run_dir.parent / "feature-store", metadata["fingerprint"])
    stored_logits, stored_embeddings = store.get(dataset.keys)
    with torch.no_grad():
        logits, embeddings = teacher(*dataset.model_inputs())
    assert torch.allclose(stored_logits, logits, atol=1e-5)
    assert stored_embeddings.shape == embeddings.shape


def test_distill_and_finetune_flows_produce_a_student_ten_times_smaller(run_dir):
    distilled = distill_flow.fn(str(run_dir))
    assert distilled["training"]["loss_terms"] == ["hinton", "mse"]
    assert (run_dir / "student_distilled.pt").exists()
    finetuned = finetune_flow.fn(str(run_dir))
    teacher_params = load_checkpoint(run_dir / "teacher.pt", load_config(run_dir / "config.yaml"))[1]["params"]
    assert finetuned["params"] * 10 <= teacher_params
    assert (run_dir / "student.pt").exists()


def test_evaluate_flow_scores_match_an_independent_computation(run_dir):
    results = evaluate_flow.fn(str(run_dir))
    assert set(results) == {"teacher", "student", "baseline"}
    assert results["baseline"]["params"] == results["student"]["params"]
    for role in ("teacher", "student", "baseline"):
        expected, _, dataset = accuracy_of(run_dir / f"{role}.pt", run_dir)
        assert results[role]["test"]["accuracy"] == pytest.approx(expected)
        assert results[role]["test"]["examples"] == len(dataset)
        supports = [c["support"] for c in results[role]["test"]["per_class"].values()]
        assert sum(supports) == len(dataset)


def test_export_flow_writes_checked_onnx_models_that_match_pytorch(run_dir):
    report = export_flow.fn(str(run_dir))
    path = run_dir / "student.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image", "audio", "mask"]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["labels"]) == [str(d) for d in range(10)]

    # Independently: ONNX Runtime on a batch size and audio length never seen at export.
    expected_accuracy, torch_logits, dataset = accuracy_of(run_dir / "student.pt", run_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image, audio, mask = (x.numpy() for x in dataset.model_inputs())
    onnx_logits, _ = session.run(None, {"image": image, "audio": audio, "mask": mask})
    assert np.abs(onnx_logits - torch_logits.numpy()).max() <= 1e-4
    assert report["student"]["accuracy"] == pytest.approx(expected_accuracy)
    assert report["student"]["max_abs_diff"] <= 1e-4
    short = {"image": image[:3], "audio": audio[:3, :4000], "mask": mask[:3]}
    with torch.no_grad():
        model, _ = load_checkpoint(run_dir / "student.pt", load_config(run_dir / "config.yaml"))
        reference, _ = model(*(torch.from_numpy(v) for v in short.values()))
    assert np.abs(session.run(None, short)[0] - reference.numpy()).max() <= 1e-4

    # Triton's config names each tensor with the ONNX Runtime session's shape, less the batch.
    config = (run_dir / "model_repository" / "student" / "config.pbtxt").read_text()
    for tensor in [*session.get_inputs(), *session.get_outputs()]:
        dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in tensor.shape[1:])
        assert f'name: "{tensor.name}"' in config
        assert f'    name: "{tensor.name}"\n    data_type: {"TYPE_BOOL" if tensor.type == "tensor(bool)" else "TYPE_FP32"}\n    dims: [ {dims} ]' in config

    # The variants, each scored independently here on the same test rows.
    variants = json.loads((run_dir / "variants" / "variants.json").read_text())
    assert set(variants) == {"fp32", "fp16", "int8_dynamic", "int8_static"}
    assert variants["fp32"]["accuracy"] == pytest.approx(expected_accuracy)
    for kind in ("fp16", "int8_dynamic", "int8_static"):
        variant = variants[kind]
        within_margin = expected_accuracy - variant["accuracy"] <= 0.005 + 1e-12
        within_parity = kind != "fp16" or variant["max_abs_diff_vs_fp32"] <= 0.1
        assert variant["accepted"] is (within_margin and within_parity)
        if not variant["accepted"]:
            assert not (run_dir / "variants" / f"student.{kind}.onnx").exists()
            continue
        variant_session = ort.InferenceSession(variant["path"], providers=["CPUExecutionProvider"])
        logits, _ = variant_session.run(None, {"image": image, "audio": audio, "mask": mask})
        assert variant["accuracy"] == pytest.approx(float((logits.argmax(1) == dataset.labels.numpy()).mean()))
        assert variant["max_abs_diff_vs_fp32"] == pytest.approx(float(np.abs(logits - onnx_logits).max()), rel=1e-5)
        assert [i.name for i in variant_session.get_inputs()] == ["image", "audio", "mask"]
        assert [i.type for i in variant_session.get_inputs()] == [i.type for i in session.get_inputs()]
    assert variants["fp16"]["bytes"] < variants["fp32"]["bytes"]

    # What each accepted variant's graph holds: float16 weights, or int8 with a float32 front end.
    graphs = {kind: onnx.load(variants[kind]["path"]).graph for kind in variants if kind != "fp32" and variants[kind]["accepted"]}
    if "fp16" in graphs:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graphs["fp16"].initializer)
    if "int8_static" in graphs:
        nodes = graphs["int8_static"].node
        assert any(n.op_type == "QuantizeLinear" for n in nodes)
        producers = {output: n.op_type for n in nodes for output in n.output}
        assert all(producers.get(n.input[0]) != "DequantizeLinear" for n in nodes if n.op_type == "Log")


def test_predict_without_torch_matches_export(run_dir, tmp_path):
    config = load_config(run_dir / "config.yaml")
    predictions = predict_without_torch(run_dir, config.data.manifest, tmp_path / "predictions.json")

    # The pipeline's own ONNX outputs on the same rows, decoded by the training loader.
    dataset = load_dataset(config.data)
    logits, expected = onnx_probabilities(run_dir / "student.onnx", dataset)
    assert [p["id"] for p in predictions] == dataset.ids
    assert [p["label"] for p in predictions] == [dataset.classes[i] for i in logits.argmax(1)]
    got = np.array([[p["probabilities"][label] for label in dataset.classes] for p in predictions])
    assert np.abs(got - expected).max() <= 1e-5


def test_benchmark_flow_reports_both_engines_and_the_provider_actually_used(run_dir):
    rows = benchmark_flow.fn(str(run_dir))
    assert json.loads((run_dir / "benchmark.json").read_text()) == rows
    svg = (run_dir / "latency.svg").read_text()
    for row in rows:
        assert f'data-series="{row["model"]} / {row["engine"]} / {row["audio_samples"]} samples"' in svg
    variants = json.loads((run_dir / "variants" / "variants.json").read_text())
    accepted = [kind for kind, variant in variants.items() if kind != "fp32" and variant["accepted"]]
    # (models x engines + variants) x batch sizes, at the trained audio length and at 0.5 s.
    assert len(rows) == (2 * 2 + len(accepted)) * 2 * 2
    trained = load_config(run_dir / "config.yaml").data.audio.num_samples
    assert sorted({r["audio_samples"] for r in rows}) == sorted({trained, 4000})
    assert {r["model"] for r in rows if r["model"].startswith("student-")} == {f"student-{kind}" for kind in accepted}
    for row in rows:
        assert BENCHMARK_KEYS <= set(row)
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["peak_mib"] >= 0
    onnx_rows = [r for r in rows if r["engine"] == "onnxruntime"]
    used = {r["provider"] for r in onnx_rows}
    if not torch.cuda.is_available():
        assert used == {"CPUExecutionProvider"}
        for gpu_provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            assert all(gpu_provider in r["providers_not_loaded"] for r in onnx_rows)
            assert f"{gpu_provider} was requested but" in (run_dir / "benchmark.md").read_text()
        # IO binding is on by default only where a GPU provider runs.
        assert not any(r["io_binding"] for r in onnx_rows)


def test_a_flow_stops_on_a_missing_file_naming_the_row(tmp_path, small_avdigits, prefect_server):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_avdigits.parent, data)
    manifest = data / small_avdigits.name
    lines = manifest.read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    (data / first[header.index("audio")]).unlink()
    config = load_config(write_config(tmp_path / "configs", manifest))
    run = tmp_path / "run"
    run.mkdir()
    save_config(config, run / "config.yaml")
    with pytest.raises(DataError, match=rf"row 1 \(id '{first[0]}'\), column 'audio': .* the file does not exist"):
        teacher_flow.fn(str(run))
