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
    assert third["promoted"] is False
    assert read_current(registry) == before
    assert [record["promoted"] for record in read_history(registry)] == [True, second["promoted"], False]


def test_promotion_keeps_current_with_other_labels(students, tmp_path):
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


def test_rollback_restores_the_model_before(students, tmp_path, capsys):
    from mmkd.cli import main
    from mmkd.promotion import make_current, rollback

    runs, test = students
    registry = tmp_path / "registry"
    promote_if_better(runs[1][0], registry, test, min_improvement=0.0)
    assert main(["rollback", str(registry)]) == 1  # the first model has nothing before it
    assert "there is no earlier one to restore" in capsys.readouterr().err

    # Whatever the scores, the second promotion below is forced through make_current.
    second = json.loads((registry / "current.json").read_text())
    second.update(model_id="run-2", onnx="models/run-1/student.onnx", previous="run-1")
    make_current(registry, second)
    assert rollback(registry)["model_id"] == "run-1"
    assert read_current(registry)["model_id"] == "run-1"
    last = read_history(registry)[-1]
    assert last["action"] == "rollback"
    assert last["from"] == "run-2"
    assert last["to"] == "run-1"


def test_over_the_latency_budget_is_not_promoted(students, tmp_path):
    runs, test = students
    run_dir = runs[1][0]
    (run_dir / "benchmark.json").write_text(json.dumps([
        {"model": "student", "engine": "onnxruntime", "batch_size": 1, "p50_ms": 0.8}]))
    try:
        kept = promote_if_better(run_dir, tmp_path / "registry", test, min_improvement=0.0, max_p50_ms=0.5)
        assert kept["promoted"] is False
        assert kept["reason"] == "over the latency budget: batch-1 p50 is 0.800 ms, budget 0.500 ms"
        assert read_current(tmp_path / "registry") is None
        within = promote_if_better(run_dir, tmp_path / "registry", test, min_improvement=0.0, max_p50_ms=1.0)
        assert within["promoted"] is True
    finally:
        (run_dir / "benchmark.json").unlink()


SWITCHER = """
import json, sys
from pathlib import Path
from mmkd.promotion import make_current
registry = Path(sys.argv[1])
records = [json.loads((registry / "models" / name / "record.json").read_text()) for name in ("a", "b")]
print("ready", flush=True)
while True:
    for record in records:
        make_current(registry, record)
"""


def test_switch_killed_midway_leaves_one_model(tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    registry = tmp_path / "registry"
    for name in ("a", "b"):
        (registry / "models" / name).mkdir(parents=True)
        (registry / "models" / name / "student.onnx").write_bytes(name.encode() * 1000)
        (registry / "models" / name / "record.json").write_text(json.dumps(
            {"model_id": name, "onnx": f"models/{name}/student.onnx", "padding": "x" * 100_000}))
    generator = random.Random(7)
    seen = set()
    for _ in range(15):
        switcher = subprocess.Popen([sys.executable, "-c", SWITCHER, str(registry)], stdout=subprocess.PIPE, text=True)
        assert switcher.stdout.readline().strip() == "ready"
        time.sleep(generator.uniform(0.01, 0.2))
        switcher.send_signal(signal.SIGKILL)
        switcher.wait()
        # current.json parses, so it is never half written, and names a complete model.
        current = read_current(registry)
        assert current["model_id"] in ("a", "b")
        assert (registry / current["onnx"]).read_bytes() == current["model_id"].encode() * 1000
        seen.add(current["model_id"])
    assert seen == {"a", "b"}
