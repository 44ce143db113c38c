"""The benchmark on an exported student: torch.compile rows beside eager ones, and IO binding."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_CONFIG
from mmkd import __version__
from mmkd.benchmarking import benchmark_model, benchmark_onnx, onnx_call
from mmkd.checkpoints import build_model
from mmkd.config import config_from_dict
from mmkd.data.loading import load_dataset
from mmkd.onnx_export import export_onnx


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_avdigits):
    """A randomly initialised tiny student, its ONNX file and the test split."""
    folder = tmp_path_factory.mktemp("exported")
    config = config_from_dict({**TINY_CONFIG, "data": {"manifest": str(small_avdigits)}}, base_dir=folder)
    test = load_dataset(config.data).subset("test")
    torch.manual_seed(0)
    model = build_model(config, "student", test.classes).eval()
    path = export_onnx(model, test, folder / "student.onnx", opset=18,
                       metadata={"mmkd_version": __version__, "labels": test.classes})
    return model, path, test


def test_compiled_rows_sit_beside_eager_ones(exported):
    model, path, test = exported
    rows = benchmark_model("student", model, path, test.model_inputs(), batch_sizes=[2],
                           providers=["CPUExecutionProvider"], threads=1, warmup=1, iterations=5,
                           torch_compile=True)
    assert [row["engine"] for row in rows] == ["onnxruntime", "pytorch-eager", "pytorch-compile"]
    for row in rows:
        assert row["batch_size"] == 2
        assert row["iterations"] == 5
        assert row["p50_ms"] > 0


def test_bound_call_returns_plain_outputs(exported):
    _, path, test = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {name: x.numpy() for name, x in zip(names, test.model_inputs(), strict=True)}
    expected = session.run(None, feed)
    bound = [value.numpy() for value in onnx_call(session, feed, io_binding=True)()]
    assert len(bound) == len(expected)
    for got, want in zip(bound, expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("setting", "bound"), [("on", True), ("off", False), ("auto", False)])
def test_binding_setting_reaches_rows(exported, setting, bound):
    _, path, test = exported
    rows = benchmark_onnx("student", path, test.model_inputs(), batch_sizes=[1, 3], providers=["CPUExecutionProvider"],
                          threads=1, warmup=1, iterations=5, io_binding=setting)
    assert [row["io_binding"] for row in rows] == [bound, bound]
