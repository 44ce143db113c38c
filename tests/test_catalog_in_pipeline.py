"""Every registered plugin, named in a config, trains a student through the pipeline's stage flows.

One tiny teacher is trained on the 120-row real data, and its outputs are stored. Each
plugin then gets a run folder of its own whose config names it: as the student's fusion,
as the only loss term, or as an alignment term next to hinton. The distill and finetune
flows run there for one epoch.
"""

from __future__ import annotations

import math

import pytest

from mmkd.checkpoints import load_checkpoint
from mmkd.config import config_from_dict, load_config, save_config
from mmkd.flows.distill import distill_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.registry import get_registry

from conftest import TINY_CONFIG

HINTON = {"name": "hinton", "weight": 1.0}
SAME_WIDTH_ALIGNMENT = {"tca", "coral"}
PLUGINS = [(kind, name) for kind in ("fusion", "losses", "alignment") for name in get_registry(kind).names()]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, small_avdigits, prefect_server):
    root = tmp_path_factory.mktemp("catalog-runs")
    folder = root / "teacher"
    folder.mkdir()
    config = config_from_dict({**TINY_CONFIG, "data": {"manifest": str(small_avdigits)}}, base_dir=root)
    save_config(config, folder / "config.yaml")
    teacher_flow.fn(str(folder))
    extract_flow.fn(str(folder))
    return folder


def plugin_config(kind: str, name: str, teacher_run) -> dict:
    config = {**TINY_CONFIG, "data": {"manifest": str(load_config(teacher_run / "config.yaml").data.manifest)}}
    config["teacher"] = {**TINY_CONFIG["teacher"], "checkpoint": str(teacher_run / "teacher.pt")}
    config["student"] = dict(TINY_CONFIG["student"])
    config["distill"] = {"losses": [HINTON], "train": {"epochs": 1, "batch_size": 32}}
    config["finetune"] = {"train": {"epochs": 1, "batch_size": 32}}
    if kind == "fusion":
        config["student"]["fusion"] = {"name": name}
    elif kind == "losses":
        config["distill"]["losses"] = [{"name": name, "weight": 1.0}]
    else:
        config["distill"]["alignment"] = [{"name": name, "weight": 0.5}]
        if name in SAME_WIDTH_ALIGNMENT:
            # TCA and CORAL need the student embedding as wide as the teacher's (32).
            config["student"]["fusion"] = {"name": "attention", "params": {"dim": 32, "heads": 2}}
    return config


@pytest.mark.parametrize(("kind", "name"), PLUGINS, ids=[f"{k}-{n}" for k, n in PLUGINS])
def test_plugin_named_in_a_config_trains_a_student(kind, name, teacher_run):
    folder = teacher_run.parent / f"{kind}-{name}"
    folder.mkdir()
    config = config_from_dict(plugin_config(kind, name, teacher_run), base_dir=folder)
    save_config(config, folder / "config.yaml")

    teacher_flow.fn(str(folder))
    assert extract_flow.fn(str(folder))["computed"] == 0
    distilled = distill_flow.fn(str(folder))
    finetuned = finetune_flow.fn(str(folder))

    terms = distilled["training"]["loss_terms"]
    if kind == "fusion":
        student, _ = load_checkpoint(folder / "student.pt", config)
        assert type(student.fusion) is get_registry("fusion").get(name)
        assert terms == ["hinton"]
    elif kind == "losses":
        assert terms == [name]
    else:
        assert terms == ["hinton", name]
    assert math.isfinite(distilled["training"]["best_val_accuracy"])
    assert finetuned["params"] == distilled["params"]


def test_alignment_between_modalities_trains_in_the_pipeline(teacher_run):
    folder = teacher_run.parent / "between-modalities"
    folder.mkdir()
    raw = plugin_config("alignment", "clip", teacher_run)
    raw["distill"]["alignment"] = [{"name": "clip", "weight": 0.5, "modalities": ["image", "audio"]}]
    config = config_from_dict(raw, base_dir=folder)
    save_config(config, folder / "config.yaml")

    teacher_flow.fn(str(folder))
    extract_flow.fn(str(folder))
    distilled = distill_flow.fn(str(folder))
    assert distilled["training"]["loss_terms"] == ["hinton", "clip:image-audio"]
    assert math.isfinite(distilled["training"]["best_val_accuracy"])
