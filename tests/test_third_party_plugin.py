"""A third-party plugin distribution, installed with pip from tests/fixtures, used from a config."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd import registry
from mmkd.cli import main
from mmkd.config import config_from_dict
from mmkd.distillation import DistillationObjective

FIXTURE = Path(__file__).parent / "fixtures" / "mmkd-example-plugin"


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    """Install the fixture into a private folder on sys.path, and rescan the losses."""
    # Building from a copy keeps setuptools' egg-info out of the repository.
    source = tmp_path / "source"
    shutil.copytree(FIXTURE, source)
    target = tmp_path / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    monkeypatch.syspath_prepend(str(target))
    importlib.invalidate_caches()
    monkeypatch.setitem(registry._REGISTRIES, "losses", registry.Registry("losses", "mmkd.losses"))
    yield target
    sys.modules.pop("mmkd_example_plugin", None)


def test_installed_loss_is_found_with_its_distribution(installed_example):
    losses = registry.get_registry("losses")
    assert {"l1_hint", "hinton", "kl", "mse"} <= set(losses.names())
    assert losses.source("l1_hint") == "mmkd_example_plugin:L1HintLoss (distribution mmkd-example-plugin)"


def test_installed_loss_is_used_from_a_config(installed_example, tmp_path):
    config = config_from_dict(
        {"data": {"manifest": "m.csv"},
         "distill": {"losses": [{"name": "l1_hint", "weight": 2.0, "params": {"scale": 0.5}}]}},
        base_dir=tmp_path,
    )
    generator = torch.Generator().manual_seed(0)
    teacher_embeddings = torch.randn(6, 3, generator=generator)
    objective = DistillationObjective(
        config.distill.losses, student_dim=4, teacher_dim=3,
        teacher_logits=torch.randn(6, 5, generator=generator), teacher_embeddings=teacher_embeddings,
    )
    student = torch.randn(2, 4, generator=generator)
    rows = torch.tensor([4, 1])
    total, values = objective((torch.zeros(2, 5), student), (None, torch.tensor([0, 1]), rows))

    # Independent value: weight 2 * scale 0.5 * mean |W s + c - t| over the two rows' teachers.
    projection = objective.terms[0].projection
    weight, bias = projection.weight.detach().numpy(), projection.bias.detach().numpy()
    expected = 2.0 * 0.5 * np.abs(student.numpy() @ weight.T + bias - teacher_embeddings[rows].numpy()).mean()
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert values == {"l1_hint": pytest.approx(expected / 2.0, rel=1e-6)}


def test_installed_loss_is_shown_by_the_cli(installed_example, capsys):
    assert main(["plugins", "show", "l1_hint"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("l1_hint (losses) from mmkd_example_plugin:L1HintLoss (distribution mmkd-example-plugin)")
    assert "scale: float = 1.0  Factor the loss is multiplied by." in out
