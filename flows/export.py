"""Export flow: the student (and the teacher, for benchmarking) to ONNX, checked for parity."""

from __future__ import annotations

from prefect import flow

from mmkd import __version__
from mmkd.benchmarking import create_session
from mmkd.checkpoints import load_checkpoint
from mmkd.config import input_names
from mmkd.flows._common import flow_logger, load_run_inputs
from mmkd.models.text import load_tokenizer
from mmkd.onnx_export import check_parity, export_onnx
from mmkd.onnx_variants import build_variants
from mmkd.runs import atomic_write_json
from mmkd.serving import write_model_repository
from mmkd.training import predict


@flow(name="export", description="Export student.onnx and teacher.onnx, check them against PyTorch, make the student's variants.")
def export_flow(run_dir: str) -> dict:
    """Write the ONNX models and the student's variants; return parity, accuracies and sizes."""
    logger = flow_logger()
    paths, config, dataset = load_run_inputs(run_dir)
    test = dataset.subset("test")

    report = {}
    for role, checkpoint, onnx_path in (
        ("student", paths.student, paths.student_onnx),
        ("teacher", paths.teacher, paths.teacher_onnx),
    ):
        # Export with the labels, preprocessing and provenance stored in the model.
        model, metadata = load_checkpoint(checkpoint, config)
        stored = {
            "mmkd_version": __version__, "role": role, "labels": dataset.classes,
            "preprocessing": {m: dataset.preprocessing[m] for m in model.modalities},
            "inputs": [*input_names(model.modalities), "mask"], "modalities": model.modalities,
            "config_fingerprint": config.fingerprint(), "model_fingerprint": metadata["fingerprint"],
        }
        if "text" in model.modalities:
            # The whole tokenizer travels in the model, so prediction needs no other file.
            stored["tokenizer"] = load_tokenizer(config.data.text.tokenizer, allow_downloads=False).backend_tokenizer.to_str()
        export_onnx(model, test, onnx_path, opset=config.export.opset, metadata=stored)

        # Compare every test row's outputs with PyTorch's, on the CPU provider.
        session, _ = create_session(onnx_path, ["CPUExecutionProvider"], threads=2)
        torch_logits, torch_embeddings = predict(model, test)
        report[role] = check_parity(
            session, torch_logits, torch_embeddings, test, max_abs_diff=config.export.parity_max_abs_diff
        )
        logger.info(
            "%s.onnx: test accuracy %.4f, max |ONNX - PyTorch| %.3g over %d rows",
            role, report[role]["accuracy"], report[role]["max_abs_diff"], len(test),
        )

    # Smaller variants of the student, each scored on the test split and kept only within the margin.
    report["variants"] = build_variants(
        paths.student_onnx, paths.run_dir / "variants", list(config.export.variants),
        test=test, calibration=dataset.subset("val"), max_accuracy_drop=config.export.max_accuracy_drop,
        fp16_max_abs_diff=config.export.fp16_max_abs_diff,
    )
    atomic_write_json(paths.run_dir / "variants" / "variants.json", report["variants"])

    # The student as a Triton model repository; the pipeline adds its model card.
    report["model_repository"] = str(write_model_repository(paths.student_onnx, paths.run_dir / "model_repository"))
    return report
