"""Stage keys change exactly where their inputs change; a stage is restored only from intact files."""

from __future__ import annotations

from pathlib import Path

from mmkd.config import config_from_dict
from mmkd.stage_cache import STAGE_INPUTS, StageCache, stage_keys

from conftest import TINY_CONFIG

ORDER = list(STAGE_INPUTS)


def keys_for(tmp_path, data_fingerprint: str = "a" * 64, **changes) -> dict[str, str]:
    raw = {**TINY_CONFIG, "data": {"manifest": "data/manifest.csv"}, **changes}
    return stage_keys(config_from_dict(raw, base_dir=tmp_path), data_fingerprint)


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [stage for stage in ORDER if before[stage] != after[stage]]


def test_stage_keys_change_downstream_only(tmp_path):
    base = keys_for(tmp_path)
    assert keys_for(tmp_path) == base
    assert len(set(base.values())) == len(ORDER)

    benchmark = {**TINY_CONFIG["benchmark"], "iterations": 9}
    assert changed(base, keys_for(tmp_path, benchmark=benchmark)) == ["benchmark"]
    export = {"opset": 17}
    assert changed(base, keys_for(tmp_path, export=export)) == ["export", "benchmark"]
    finetune = {"train": {**TINY_CONFIG["finetune"]["train"], "epochs": 3}}
    assert changed(base, keys_for(tmp_path, finetune=finetune)) == ["finetune", "evaluate", "export", "benchmark"]
    distill = {"train": {**TINY_CONFIG["distill"]["train"], "epochs": 3}}
    assert changed(base, keys_for(tmp_path, distill=distill)) == ["distill", "finetune", "evaluate", "export", "benchmark"]
    assert changed(base, keys_for(tmp_path, seed=1)) == ORDER[1:]
    assert changed(base, keys_for(tmp_path, data_fingerprint="b" * 64)) == ORDER
    # The run's name is not an input of any stage.
    assert changed(base, keys_for(tmp_path, name="other")) == []


def test_restore_copies_recorded_files_and_refuses_changed_ones(tmp_path):
    cache = StageCache(tmp_path / "stage-cache")
    first = tmp_path / "run-1"
    (first / "validation" / "gx").mkdir(parents=True)
    (first / "validation" / "validation.json").write_text("{}")
    (first / "validation" / "gx" / "index.html").write_text("<html></html>")
    cache.store("validate", "k1", first, {"report": str(first / "validation" / "validation.json"), "rows_in": 3})

    second = tmp_path / "run-2"
    second.mkdir()
    result, source = cache.restore("validate", "k1", second)
    assert source == first
    assert result == {"report": str(second / "validation" / "validation.json"), "rows_in": 3}
    assert (second / "validation" / "gx" / "index.html").read_text() == "<html></html>"

    assert cache.restore("validate", "other-key", tmp_path / "run-3") is None
    (first / "validation" / "gx" / "index.html").write_text("<html>edited</html>")
    third = tmp_path / "run-3"
    third.mkdir()
    assert cache.restore("validate", "k1", third) is None
    assert list(third.iterdir()) == []


def test_restore_misses_on_deleted_source_file(tmp_path):
    cache = StageCache(tmp_path / "stage-cache")
    first = tmp_path / "run-1"
    first.mkdir()
    (first / "teacher.pt").write_bytes(b"weights")
    cache.store("teacher", "k", first, {"params": 1})
    Path(first / "teacher.pt").unlink()
    assert cache.restore("teacher", "k", tmp_path) is None
