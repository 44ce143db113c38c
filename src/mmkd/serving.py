"""The shipped student: a Triton Inference Server model repository, and a model card.

The repository follows Triton's layout, `<repository>/<model>/config.pbtxt` beside
`<repository>/<model>/1/model.onnx`, with the batch dimension left to Triton's dynamic
batching. Input and output dimensions are read from the ONNX model itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from mmkd.reports import metrics_rows
from mmkd.runs import atomic_write, atomic_write_text

# ONNX element types to Triton's data types, for the types an exported student uses.
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
}


def _tensor_entries(values: list[onnx.ValueInfoProto]) -> str:
    """Render graph inputs or outputs as Triton tensor entries, without the batch dimension."""
    entries = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tensor.shape.dim[1:]]
        entries.append(
            f'  {{\n    name: "{value.name}"\n    data_type: {TRITON_TYPES[tensor.elem_type]}\n'
            f"    dims: [ {', '.join(dims)} ]\n  }}"
        )
    return ",\n".join(entries)


def triton_config(model: onnx.ModelProto, name: str, *, max_batch_size: int) -> str:
    """Return config.pbtxt for an ONNX model whose first dimension is the batch."""
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{_tensor_entries(list(model.graph.input))}\n]\n"
        f"output [\n{_tensor_entries(list(model.graph.output))}\n]\n"
        "dynamic_batching { }\n"
    )


def write_model_repository(onnx_path: Path, repository: Path, name: str = "student", *, max_batch_size: int = 128) -> Path:
    """Lay the ONNX model out as a Triton model repository; return the model's folder."""
    folder = Path(repository) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "1" / "model.onnx", lambda tmp: shutil.copyfile(onnx_path, tmp))
    config = triton_config(onnx.load(str(onnx_path), load_external_data=False), name, max_batch_size=max_batch_size)
    atomic_write_text(folder / "config.pbtxt", config)
    return folder


def _cell(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def model_card(metrics: dict, benchmark: list[dict], *, run_name: str) -> str:
    """Return the student's model card as markdown: what it is, how it scores, what it does not do."""
    run, teacher, validation = metrics["run"], metrics["teacher"], metrics["validation"]
    table = "\n".join(
        f"| {row['model']} | {row['engine']} | {row['parameters']:,} | {_cell(row['test_accuracy'], 4)} | "
        f"{_cell(row['macro_f1'], 4)} | {_cell(row['p50_ms_batch1'], 3)} |"
        for row in metrics_rows(metrics, benchmark)
    )
    return f"""# Model card: student of run {run_name}

A small multimodal classifier distilled by mmkd {run['mmkd_version']} from a larger
teacher, exported to ONNX (`1/model.onnx` in this Triton model repository).

## Inputs and outputs

The inputs are one tensor per modality and `mask` (which modalities each row has), with
the preprocessing stored in the model's metadata (`preprocessing`) and the labels in
`labels`. The outputs are `logits` over the labels and the fused `embedding`.

## Provenance

- Config fingerprint: `{run['config_fingerprint']}`
- Data fingerprint (manifest and every file it names): `{run.get('data_fingerprint', 'not recorded')}`
- Rows: {validation['rows_in']} in, {validation['rows_kept']} kept by validation, {validation['rows_quarantined']} set aside
- Teacher: {teacher['params']:,} parameters, fingerprint `{teacher['fingerprint']}`
- Trained on: {run['device']}, seed {run['seed']}

## Test metrics

| model | engine | parameters | test accuracy | macro-F1 | p50 ms, batch 1 |
| --- | --- | ---: | ---: | ---: | ---: |
{table}

Latency is from this run's benchmark on {run['device']}, with the thread count of the
config; it differs on other hardware.

## Limitations

- The scores hold for data like the test split: the same sensors, preprocessing, label
  set and class balance. Inputs from another distribution need their own evaluation.
- The student is smaller than the teacher and is expected to be less accurate on hard
  cases; compare the two rows above.
- The model predicts only the labels it was trained on; it has no "none of these" output.
"""
