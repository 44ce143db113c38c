"""What the variants keep in float32, how they are judged, and what each one's graph holds."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from mmkd.onnx_variants import frontend_nodes, judge


def test_frontend_is_every_node_a_log_depends_on():
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["audio", "audio"], ["power"], name="power"),
            helper.make_node("MatMul", ["power", "mel"], ["mels"], name="mel_filter"),
            helper.make_node("Log", ["mels"], ["log_mels"], name="log"),
            helper.make_node("Conv", ["log_mels", "w"], ["features"], name="encoder"),
            helper.make_node("Relu", ["image"], ["image_features"], name="image_relu"),
        ],
        "frontend",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("audio", "image", "mel", "w")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("features", "image_features")],
    )
    assert frontend_nodes(helper.make_model(graph)) == ["log", "mel_filter", "power"]
    assert frontend_nodes(onnx.ModelProto()) == []


@pytest.mark.parametrize(("fp32", "variant", "margin", "accepted"), [
    (0.95, 0.95, 0.005, True),
    (0.95, 0.945, 0.005, True),   # exactly half a point
    (0.95, 0.94, 0.005, False),
    (0.95, 0.96, 0.0, True),      # better is always accepted
])
def test_judge(fp32, variant, margin, accepted):
    assert judge(fp32, variant, margin)[0] is accepted


def test_judge_reason_states_the_figures():
    assert judge(0.95, 0.90, 0.005)[1] == "accuracy 0.9000 is 5.00 points below fp32 0.9500, more than the allowed 0.50"


def test_judge_reason_for_a_better_variant():
    assert judge(0.90, 0.95, 0.005)[1] == "accuracy 0.9500, 5.00 points above fp32 0.9000 (allowed loss 0.50)"
