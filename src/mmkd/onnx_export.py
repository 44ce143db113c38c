"""Export a classifier to ONNX and check it against PyTorch on real rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from mmkd.config import input_names, modalities_of
from mmkd.data.loading import TensorDataset
from mmkd.errors import ExportError
from mmkd.models.adapters import merged
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.runs import atomic_write
from mmkd.training import classification_metrics

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("logits", "embedding")
_TWO_GIB = 2 * 1024**3


def export_onnx(model: MultimodalClassifier, example: TensorDataset, path: Path, *, opset: int, metadata: dict) -> Path:
    """Write `model` as ONNX with dynamic batch size and audio length, and check it.

    Inputs are named after the modalities, plus "mask"; outputs are "logits" and
    "embedding". `metadata` is stored in the model's metadata_props as JSON strings.

    Raises:
        ExportError: onnx.checker rejects the exported model.
    """
    # LoRA adapters are folded into the weights they adapt: the exported graph has none.
    model = merged(model).eval().cpu()
    batch = Dim("batch", min=1, max=65536)
    shapes = []
    for modality in model.modalities:
        if modality == "audio":
            shapes.append({0: batch, 1: Dim("samples", min=512, max=10**8)})
        elif modality == "text":
            tokens = Dim("tokens", min=2, max=8192)
            shapes += [{0: batch, 1: tokens}, {0: batch, 1: tokens}]
        else:
            shapes.append({0: batch})
    shapes.append({0: batch})
    args = tuple(x[:2] for x in example.with_modalities(model.modalities).model_inputs())
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > _TWO_GIB * 0.9
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        input_names=[*input_names(model.modalities), "mask"],
        dynamic_shapes=(tuple(shapes),),
        opset_version=opset,
        external_data=large,
        verbose=False,
    )
    proto = program.model_proto
    # Named here rather than by the exporter, which can reuse an output name for an inner value
    # (a transformer's "embedding" lookup), leaving two producers of one name.
    _rename_outputs(proto.graph, list(OUTPUT_NAMES))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported model for {path}: {exc}") from None
    atomic_write(Path(path), lambda tmp: onnx.save_model(proto, str(tmp), save_as_external_data=large))
    logger.info("Exported %s (opset %d, %.1f kB)", path, opset, Path(path).stat().st_size / 1024)
    return Path(path)


def _rename_outputs(graph: onnx.GraphProto, names: list[str]) -> None:
    """Give the graph's outputs `names`, first renaming any inner value that already has one of them."""

    def rename(old: str, new: str) -> None:
        for node in graph.node:
            node.input[:] = [new if name == old else name for name in node.input]
            node.output[:] = [new if name == old else name for name in node.output]
        for value in [*graph.value_info, *graph.output]:
            if value.name == old:
                value.name = new

    produced = {name for node in graph.node for name in node.output}
    for name in names:
        if name in produced and name not in [o.name for o in graph.output]:
            rename(name, f"{name}_inner")
    for output, name in zip(list(graph.output), names, strict=True):
        if output.name != name:
            rename(output.name, name)


def run_onnx(session, data: TensorDataset, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Return the ONNX model's (logits, embeddings) for every row of `data`.

    The model is fed the modalities its inputs are named after, then the mask.
    """
    names = [i.name for i in session.get_inputs()]
    inputs = data.with_modalities(modalities_of(names)).model_inputs()
    logits, embeddings = [], []
    for start in range(0, len(data), batch_size):
        feed = {name: x[start : start + batch_size].numpy() for name, x in zip(names, inputs, strict=True)}
        out_logits, out_embedding = session.run(list(OUTPUT_NAMES), feed)
        logits.append(out_logits)
        embeddings.append(out_embedding)
    return np.concatenate(logits), np.concatenate(embeddings)


def check_parity(
    session, torch_logits: torch.Tensor, torch_embeddings: torch.Tensor, data: TensorDataset, *, max_abs_diff: float
) -> dict:
    """Compare ONNX Runtime with PyTorch on every row of `data`, per output.

    Returns:
        The largest absolute difference per output and overall, the row id where it
        occurs, the ONNX predictions' accuracy and their agreement with PyTorch's.

    Raises:
        ExportError: a difference exceeds `max_abs_diff`; names the worst row.
    """
    onnx_logits, onnx_embeddings = run_onnx(session, data)
    report: dict = {"rows": len(data), "tolerance": max_abs_diff, "outputs": {}}
    worst_diff, worst_output, worst_row = 0.0, "", ""
    for name, ours, reference in (
        ("logits", onnx_logits, torch_logits.numpy()),
        ("embedding", onnx_embeddings, torch_embeddings.numpy()),
    ):
        per_row = np.abs(ours - reference).reshape(len(data), -1).max(axis=1)
        row = int(per_row.argmax())
        report["outputs"][name] = {"max_abs_diff": float(per_row[row]), "worst_row_id": data.ids[row]}
        if per_row[row] >= worst_diff:
            worst_diff, worst_output, worst_row = float(per_row[row]), name, data.ids[row]
    predicted = onnx_logits.argmax(axis=1)
    report["max_abs_diff"] = worst_diff
    report["accuracy"] = int((predicted == data.labels.numpy()).sum()) / len(data)
    report["agreement_with_pytorch"] = float((predicted == torch_logits.argmax(1).numpy()).mean())
    report["macro_f1"] = classification_metrics(torch.from_numpy(onnx_logits), data.labels, data.classes)["macro_f1"]
    if worst_diff > max_abs_diff:
        raise ExportError(
            f"ONNX output {worst_output!r} differs from PyTorch by {worst_diff:.3g} on row {worst_row!r}, "
            f"over the tolerance export.parity_max_abs_diff={max_abs_diff:g}. Check the model for operators "
            "that export inexactly, or raise the tolerance if the difference is expected."
        )
    return report
