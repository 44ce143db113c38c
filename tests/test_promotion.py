"""The promotion gate: decisions against hand-checked cases, and real ONNX students scored on real rows."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mmkd import __version__
from mmkd.checkpoints import build_model
from mmkd.config import config_from_dict
from mmkd.data.loading import load_dataset
from mmkd.onnx_export import export_onnx
from mmkd.promotion import decide, promote_if_better, read_current, read_history
from mmkd.training import predict

from conftest import TINY_CONFIG


@pytest.mark.parametrize(("candidate", "current", "margin", "promoted"), [
    (0.80, None, 0.0, True),    # nothing promoted yet
    (0.80, 0.80, 0.0, True),    # as good is not worse
    (0.79, 0.80, 0.0, False),
    (0.85, 0.80, 0.05, True),   # exactly the margin
    (0.84, 0.80, 0.05, False),
])
def test_decide(candidate, current, margin, promoted):
    assert decide(candidate, current, margin)[0] is promoted


@pytest.fixture(scope="module")
def students(tmp_path_factory, small_avdigits):
    """Two untrained students of different seeds exported to ONNX, and the real test rows."""
    folder = tmp_path_factory.mktemp("students")
    config = config_from_dict({**TINY_CONFIG, "data": {"manifest": str(small_avdigits)}}, base_dir=folder)
    test = load_dataset(config.data).subset("test")
    runs = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model(config, "student", test.classes).eval()
        run_dir = folder / f"run-{seed}"
        export_onnx(model, test, run_dir / "student.onnx", opset=18,
                    metadata={"mmkd_version": __version__, "labels": test.classes})
        logits, _ = predict(model, test)
        runs[seed] = (run_dir, float((logits.argmax(1) == test.labels).float().mean()))
    return runs, test


def test_promotes_only_a_student_that_is_not_worse(students, tmp_path):
    runs, test = students
    registry = tmp_path / "registry"
    (first_dir, first_accuracy), (second_dir, second_accuracy) = runs[1], runs[2]

    first = promote_if_better(first_dir, registry, test, min_improvement=0.0)
    assert first["promoted"] and first["current"] is None
    assert first["candidate_accuracy"] == pytest.approx(first_accuracy)
    assert read_current(registry)["model_id"] == "run-1"
    assert (registry / "models" / "run-1" / "student.onnx").read_bytes() == (first_dir / "student.onnx").read_bytes()

    second = promote_if_better(second_dir, registry, test, min_improvement=0.0)
    assert second["current_accuracy"] == pytest.approx(first_accuracy)
    assert second["candidate_accuracy"] == pytest.approx(second_accuracy)
    assert second["promoted"] is (second_accuracy >= first_accuracy)
    assert read_current(registry)["model_id"] == ("run-2" if second["promoted"] else "run-1")

    # A margin no student can reach keeps the current model.
    before = read_current(registry)
    third = promote_if_better(first_dir, registry, test, min_improvement=1.0)
    assert third["promoted"] is False and read_current(registry) == before
    assert [record["promoted"] for record in read_history(registry)] == [True, second["promoted"], False]


def test_a_current_model_with_other_labels_is_kept_and_the_reason_recorded(students, tmp_path):
    import onnx

    runs, test = students
    registry = tmp_path / "registry"
    promote_if_better(runs[1][0], registry, test, min_improvement=0.0)
    # The current model predicts other labels, e.g. from before the label set was renamed.
    current_path = registry / read_current(registry)["onnx"]
    model = onnx.load(str(current_path))
    for entry in model.metadata_props:
        if entry.key == "labels":
            entry.value = json.dumps([f"digit-{c}" for c in test.classes])
    onnx.save(model, str(current_path))

    record = promote_if_better(runs[2][0], registry, test, min_improvement=0.0)
    assert record["promoted"] is False
    assert record["reason"].startswith("not comparable, the current model stays")
    assert read_current(registry)["model_id"] == "run-1"

    # A candidate that predicts other labels than its own test data is an error, not a decision.
    renamed = dataclasses.replace(test, classes=[f"digit-{c}" for c in test.classes])
    with pytest.raises(ValueError, match="predicts labels"):
        promote_if_better(runs[2][0], tmp_path / "other-registry", renamed, min_improvement=0.0)
