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


def test_fp16_over_tolerance_is_rejected(tmp_path, small_avdigits):
    import torch

    from conftest import TINY_CONFIG
    from mmkd import __version__
    from mmkd.checkpoints import build_model
    from mmkd.config import config_from_dict
    from mmkd.data.loading import load_dataset
    from mmkd.onnx_export import export_onnx
    from mmkd.onnx_variants import build_variants

    config = config_from_dict({**TINY_CONFIG, "data": {"manifest": str(small_avdigits)}}, base_dir=tmp_path)
    dataset = load_dataset(config.data)
    test = dataset.subset("test")
    torch.manual_seed(0)
    source = export_onnx(build_model(config, "student", dataset.classes).eval(), test, tmp_path / "student.onnx",
                         opset=18, metadata={"mmkd_version": __version__, "labels": dataset.classes})

    # A tolerance no fp16 model meets: the variant is judged on its logits, not only its accuracy.
    report = build_variants(source, tmp_path / "variants", ["fp16"], test=test, calibration=dataset.subset("val"),
                            max_accuracy_drop=1.0, fp16_max_abs_diff=1e-9)
    fp16 = report["fp16"]
    assert fp16["accepted"] is False
    assert fp16["path"] is None
    assert not (tmp_path / "variants" / "student.fp16.onnx").exists()
    assert fp16["worst_row_id"] in test.ids
    assert fp16["reason"].startswith(f"a logit of row {fp16['worst_row_id']!r} differs from fp32 by ")

    kept = build_variants(source, tmp_path / "kept", ["fp16"], test=test, calibration=dataset.subset("val"),
                          max_accuracy_drop=1.0, fp16_max_abs_diff=1.0)
    assert kept["fp16"]["accepted"] is True
    assert (tmp_path / "kept" / "student.fp16.onnx").exists()
