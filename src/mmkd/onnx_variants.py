"""Smaller ONNX variants of an exported student: float16, and int8 by dynamic or static quantization.

All three are made with ONNX Runtime's own tools. Inputs and outputs stay float32, so a
caller feeds every variant the same arrays. Quantization leaves the audio front end
(the spectrogram, up to and including its logarithm) in float32, because int8 cannot
hold its range.

Each variant is scored on the test split. One whose accuracy falls more than the allowed
margin below the float32 model's is rejected: its file is deleted and its figures are
kept in the report.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from mmkd.config import modalities_of
from mmkd.data.loading import TensorDataset

logger = logging.getLogger(__name__)

VARIANTS = ("fp16", "int8_dynamic", "int8_static")


def frontend_nodes(model: onnx.ModelProto) -> list[str]:
    """Name every node that a Log node depends on, and the Log nodes: the spectrogram front end."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found: set[str] = set()
    pending = [node for node in model.graph.node if node.op_type == "Log"]
    while pending:
        node = pending.pop()
        if node.name in found:
            continue
        found.add(node.name)
        pending += [producers[name] for name in node.input if name in producers]
    return sorted(found)


class _BatchReader(CalibrationDataReader):
    """Feed calibration rows to ONNX Runtime's static quantizer, 32 rows at a time."""

    def __init__(self, names: list[str], data: TensorDataset, batch_size: int = 32):
        inputs = data.with_modalities(modalities_of(names)).model_inputs()
        self._batches = iter([
            {name: x[start : start + batch_size].numpy() for name, x in zip(names, inputs, strict=True)}
            for start in range(0, len(data), batch_size)
        ])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """Run the block with `folder` as the current folder, then return to the previous one."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def make_variant(kind: str, source: Path, target: Path, calibration: TensorDataset) -> Path:
    """Write variant `kind` of the float32 model `source` to `target`.

    Args:
        kind: "fp16", "int8_dynamic" or "int8_static".
        source: The float32 model.
        target: Where to write the variant.
        calibration: Rows whose activation ranges calibrate int8_static (the validation split).
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
        return target

    # Quantization wants shapes inferred and the graph folded first.
    prepared = target.with_name(f".{target.stem}.prepared.onnx")
    try:
        # When symbolic shape inference fails, ONNX Runtime dumps the model into the current
        # folder; a temporary one keeps that dump out of the user's.
        with tempfile.TemporaryDirectory(prefix="mmkd-quant-") as scratch, _working_folder(Path(scratch)):
            quant_pre_process(str(source), str(prepared))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises a bare Exception here
        # Symbolic shape inference does not cover every graph (transformers' attention masks);
        # ONNX's own shape inference is enough for quantization.
        logger.info("Symbolic shape inference failed (%s); preparing %s with ONNX shape inference only", exc, source.name)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    try:
        excluded = frontend_nodes(onnx.load(str(prepared)))
        if kind == "int8_dynamic":
            quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        elif kind == "int8_static":
            names = [i.name for i in onnx.load(str(prepared)).graph.input]
            quantize_static(
                str(prepared), str(target), _BatchReader(names, calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            )
        else:
            raise ValueError(f"unknown ONNX variant {kind!r}; expected one of {', '.join(VARIANTS)}")
    finally:
        prepared.unlink(missing_ok=True)
    return target


def judge(fp32_accuracy: float, accuracy: float, max_drop: float) -> tuple[bool, str]:
    """Return (accepted, reason) for a variant scored on the same rows as the float32 model."""
    drop = fp32_accuracy - accuracy
    # Accuracies are multiples of 1/rows; tolerate float round-off at the boundary.
    if drop <= max_drop + 1e-12:
        change = f"{drop * 100:.2f} points below" if drop > 0 else f"{-drop * 100:.2f} points above"
        return True, f"accuracy {accuracy:.4f}, {change} fp32 {fp32_accuracy:.4f} (allowed loss {max_drop * 100:.2f})"
    return False, f"accuracy {accuracy:.4f} is {drop * 100:.2f} points below fp32 {fp32_accuracy:.4f}, more than the allowed {max_drop * 100:.2f}"


def build_variants(
    source: Path, folder: Path, kinds: list[str], *, test: TensorDataset, calibration: TensorDataset,
    max_accuracy_drop: float, fp16_max_abs_diff: float,
) -> dict[str, dict[str, Any]]:
    """Make, score and judge each variant of `source`; delete the rejected ones.

    Every variant must keep its accuracy within `max_accuracy_drop` of the float32 model's.
    The fp16 variant must also keep every logit within `fp16_max_abs_diff` of the float32
    model's; int8 logits move by design, so only their accuracy is judged.

    Returns:
        Per variant: path (None when rejected), size in bytes, test accuracy, the largest
        |logit - fp32 logit| over the test split and the row where it occurs, accepted and
        reason. Under "fp32" the same figures for the source model.
    """
    import onnxruntime as ort

    from mmkd.onnx_export import run_onnx

    def score(path: Path) -> tuple[float, np.ndarray]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits, _ = run_onnx(session, test)
        return float((logits.argmax(axis=1) == test.labels.numpy()).mean()), logits

    fp32_accuracy, fp32_logits = score(source)
    report: dict[str, dict[str, Any]] = {"fp32": {
        "path": str(source), "bytes": source.stat().st_size, "accuracy": fp32_accuracy,
        "max_abs_diff_vs_fp32": 0.0, "accepted": True, "reason": "the exported model",
    }}
    for kind in kinds:
        try:
            path = make_variant(kind, source, folder / f"{source.stem}.{kind}.onnx", calibration)
            accuracy, logits = score(path)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's tools fail in many ways; the other variants still count
            reason = f"could not be made or run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            report[kind] = {"path": None, "bytes": None, "accuracy": None, "max_abs_diff_vs_fp32": None,
                            "accepted": False, "reason": reason}
            (folder / f"{source.stem}.{kind}.onnx").unlink(missing_ok=True)
            logger.warning("ONNX variant %s rejected: %s", kind, reason)
            continue
        accepted, reason = judge(fp32_accuracy, accuracy, max_accuracy_drop)
        per_row = np.abs(logits - fp32_logits).max(axis=1)
        worst = int(per_row.argmax())
        if accepted and kind == "fp16" and per_row[worst] > fp16_max_abs_diff:
            accepted = False
            reason = (f"a logit of row {test.ids[worst]!r} differs from fp32 by {per_row[worst]:.4g}, "
                      f"more than export.fp16_max_abs_diff {fp16_max_abs_diff:g}")
        report[kind] = {"path": str(path) if accepted else None, "bytes": path.stat().st_size, "accuracy": accuracy,
                        "max_abs_diff_vs_fp32": float(per_row[worst]), "worst_row_id": test.ids[worst],
                        "accepted": accepted, "reason": reason}
        if not accepted:
            path.unlink()
            logger.warning("ONNX variant %s rejected: %s", kind, reason)
        else:
            logger.info("ONNX variant %s: %.1f kB, %s", kind, report[kind]["bytes"] / 1024, reason)
    return report
