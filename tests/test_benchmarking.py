"""The benchmark with torch.compile on: compiled rows beside eager ones, on an exported student."""

from __future__ import annotations

import torch

from conftest import TINY_CONFIG
from mmkd import __version__
from mmkd.benchmarking import benchmark_model
from mmkd.checkpoints import build_model
from mmkd.config import config_from_dict
from mmkd.data.loading import load_dataset
from mmkd.onnx_export import export_onnx


def test_compiled_rows_sit_beside_eager_ones(tmp_path, small_avdigits):
    config = config_from_dict({**TINY_CONFIG, "data": {"manifest": str(small_avdigits)}}, base_dir=tmp_path)
    test = load_dataset(config.data).subset("test")
    torch.manual_seed(0)
    model = build_model(config, "student", test.classes).eval()
    path = export_onnx(model, test, tmp_path / "student.onnx", opset=18,
                       metadata={"mmkd_version": __version__, "labels": test.classes})

    rows = benchmark_model("student", model, path, test.model_inputs(), batch_sizes=[2],
                           providers=["CPUExecutionProvider"], threads=1, warmup=1, iterations=5,
                           torch_compile=True)
    assert [row["engine"] for row in rows] == ["onnxruntime", "pytorch-eager", "pytorch-compile"]
    for row in rows:
        assert row["batch_size"] == 2
        assert row["iterations"] == 5
        assert row["p50_ms"] > 0
