"""The Triton model repository of a student, checked against a hand-written config."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from mmkd.serving import triton_config, write_model_repository

GOLDEN_CONFIG = '''name: "student"
platform: "onnxruntime_onnx"
max_batch_size: 128
input [
  {
    name: "image"
    data_type: TYPE_FP32
    dims: [ 1, 28, 28 ]
  },
  {
    name: "audio"
    data_type: TYPE_FP32
    dims: [ -1 ]
  },
  {
    name: "mask"
    data_type: TYPE_BOOL
    dims: [ 2 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching { }
'''


def student_like_model() -> onnx.ModelProto:
    """A graph with a student's inputs and outputs: dynamic batch and audio length."""
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28]),
        helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 2]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    weights = helper.make_tensor("weights", TensorProto.FLOAT, [784, 10], [0.0] * 7840)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "student", inputs, outputs, initializer=[weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_triton_config_matches_golden():
    assert triton_config(student_like_model(), "student", max_batch_size=128) == GOLDEN_CONFIG


def test_model_repository_layout(tmp_path):
    source = tmp_path / "student.onnx"
    onnx.save(student_like_model(), str(source))
    folder = write_model_repository(source, tmp_path / "repository")
    assert folder == tmp_path / "repository" / "student"
    assert (folder / "1" / "model.onnx").read_bytes() == source.read_bytes()
    assert (folder / "config.pbtxt").read_text() == GOLDEN_CONFIG
