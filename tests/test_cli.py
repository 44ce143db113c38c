import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from mmkd.cli import main

from conftest import FSDD_DIR, MNIST_CSV, require_shared_data


def test_bad_config_exits_2_with_one_clear_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {manifest: m.csv}\nteacher: {widht: 3}\n", encoding="utf-8")
    status = main(["run", str(config), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("mmkd: config error: ")
    assert "unknown key 'teacher.widht'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_run_missing_file_exits_1_naming_row(tmp_path, small_avdigits, prefect_server):
    import os
    import shutil

    from prefect.settings import PREFECT_API_URL

    from conftest import write_config

    data = tmp_path / "data"
    shutil.copytree(small_avdigits.parent, data)
    frame = pd.read_csv(data / "manifest.csv", dtype=str)
    (data / frame.loc[4, "image"]).unlink()
    config = write_config(tmp_path, data / "manifest.csv")
    # The command in its own process, as a user runs it, against the session's test server.
    result = subprocess.run(
        [str(Path(sys.executable).with_name("mmkd")), "run", str(config), "--out", str(tmp_path / "runs")],
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, capture_output=True, text=True, timeout=300,
    )
    status, err = result.returncode, result.stderr
    assert status == 1
    assert f"row '{frame.loc[4, 'id']}': image '{frame.loc[4, 'image']}' cannot be used: file not found" in err
    assert "Traceback" not in err


def test_missing_fsdd_folder_exits_1_saying_what_to_pass(tmp_path, capsys):
    status = main(["demo", "--out", str(tmp_path / "demo"), "--fsdd-dir", str(tmp_path / "nowhere"), "--quick"])
    err = capsys.readouterr().err
    assert status == 1
    assert "nowhere" in err
    assert "--fsdd-dir" in err
    assert "Traceback" not in err


def test_demo_without_fsdd_and_without_download_says_what_to_pass(tmp_path, capsys):
    status = main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    err = capsys.readouterr().err
    assert status == 1
    assert "--fsdd-dir" in err


def test_data_avdigits_writes_a_manifest_with_held_out_speakers(tmp_path, capsys):
    require_shared_data()
    out = tmp_path / "avdigits"
    status = main([
        "data", "avdigits", "--out", str(out), "--fsdd-dir", str(FSDD_DIR), "--mnist", str(MNIST_CSV),
        "--per-digit", "10", "--test-speakers", "lucas",
    ])
    assert status == 0
    assert Path(capsys.readouterr().out.strip()) == out / "manifest.csv"
    frame = pd.read_csv(out / "manifest.csv", dtype=str)
    assert len(frame) == 100
    assert set(frame.loc[frame["split"] == "test", "speaker"]) == {"lucas"}
    assert "lucas" not in set(frame.loc[frame["split"] != "test", "speaker"])
    assert json.loads((out / "dataset.json").read_text())["seed"] == 0


def test_plugins_command_lists_the_built_in_plugins(capsys):
    assert main(["plugins"]) == 0
    listed = {tuple(line.split()[:2]) for line in capsys.readouterr().out.splitlines()}
    for entry in [("fusion", "concat"), ("fusion", "attention"), ("losses", "mse"), ("losses", "kl"), ("losses", "hinton")]:
        assert entry in listed


def test_plugins_list_empty_kind(capsys, monkeypatch):
    from mmkd import registry

    # A registry of the alignment kind that scans an entry-point group that no distribution declares.
    monkeypatch.setitem(registry._REGISTRIES, "alignment", registry.Registry("alignment", "mmkd.tests.no-such-group"))
    assert main(["plugins", "list", "--kind", "alignment"]) == 0
    assert capsys.readouterr().out.split() == ["alignment", "(no", "plugins", "installed)"]


def test_plugins_list_json_describes_parameters(capsys):
    assert main(["plugins", "list", "--kind", "losses", "--json"]) == 0
    listed = {info["name"]: info for info in json.loads(capsys.readouterr().out)}
    assert listed["hinton"]["params"]["alpha"] == {
        "type": "float", "default": "0.9",
        "description": "Weight of the soft-target term. The label cross-entropy gets 1 - alpha.",
    }
    assert listed["hinton"]["source"] == "mmkd.plugins.losses:HintonLoss (distribution mmkd)"
    assert listed["hinton"]["error"] is None


def test_plugins_show_prints_formula_and_parameters(capsys):
    assert main(["plugins", "show", "tensor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tensor (fusion) from mmkd.plugins.fusion:TensorFusion")
    assert "Z = [z_1; 1] ⊗ [z_2; 1]" in out
    assert "  dim: int = 8  Width each modality is projected to before the product." in out


def test_plugins_show_unknown_name_suggests_closest(capsys):
    assert main(["plugins", "show", "lowrnk"]) == 2
    assert "No plugin is named 'lowrnk'. Did you mean 'lowrank'?" in capsys.readouterr().err


def test_installed_console_command_reports_a_missing_config_without_traceback(tmp_path):
    command = Path(sys.executable).parent / "mmkd"
    result = subprocess.run(
        [str(command), "run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "missing.yaml does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_distill_nproc_below_one_exits_2(tmp_path, capsys):
    assert main(["distill", str(tmp_path), "--nproc", "0"]) == 2
    assert "--nproc must be at least 1, got 0" in capsys.readouterr().err


def test_tune_without_search_space_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {manifest: m.csv}\n", encoding="utf-8")
    assert main(["tune", str(config), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "tune.space is empty" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()
