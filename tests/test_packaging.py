"""A non-editable build ships flows and plugins inside mmkd and no generic top-level names."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_flows_and_plugins_into_the_mmkd_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("mmkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"mmkd", next(n for n in top_level if n.endswith(".dist-info"))}
    for module in ("mmkd/flows/pipeline.py", "mmkd/flows/teacher.py", "mmkd/plugins/fusion.py",
                   "mmkd/plugins/losses.py", "mmkd/plugins/relation_losses.py", "mmkd/plugins/alignment.py",
                   "mmkd/configs/avdigits.yaml", "mmkd/validation/probes.py", "mmkd/deployments/prefect.yaml",
                   "mmkd/flows/retrain.py", "mmkd/orchestration.py"):
        assert module in names
    for init in (ROOT / "src" / "mmkd").rglob("__init__.py"):
        assert f"mmkd/{init.parent.relative_to(ROOT / 'src' / 'mmkd').as_posix()}/__init__.py".replace("mmkd/./", "mmkd/") in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    # Sections are [group] headers followed by "name = module:object" lines.
    groups = dict(section.split("]\n", 1) for section in entry_points.strip().lstrip("[").split("\n\n["))
    assert "hinton = mmkd.plugins.losses:HintonLoss" in groups["mmkd.losses"].splitlines()
    assert "rkd = mmkd.plugins.relation_losses:RKDLoss" in groups["mmkd.losses"].splitlines()
    assert "tca = mmkd.plugins.alignment:TCAAlignment" in groups["mmkd.alignment"].splitlines()
    assert "lowrank = mmkd.plugins.fusion:LowRankFusion" in groups["mmkd.fusion"].splitlines()
    assert "mmkd = mmkd.cli:main" in entry_points


def test_onnxruntime_gpu_and_cpu_builds_are_never_required_together():
    from packaging.requirements import Requirement

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    runtimes = [r for r in requirements if r.name in ("onnxruntime", "onnxruntime-gpu")]
    assert len(runtimes) == 2
    platforms = [
        {"sys_platform": "linux", "platform_machine": "x86_64"},
        {"sys_platform": "linux", "platform_machine": "aarch64"},
        {"sys_platform": "win32", "platform_machine": "AMD64"},
        {"sys_platform": "darwin", "platform_machine": "arm64"},
    ]
    for platform in platforms:
        chosen = [r.name for r in runtimes if r.marker.evaluate(platform)]
        assert len(chosen) == 1, platform
    assert [r.name for r in runtimes if r.marker.evaluate(platforms[0])] == ["onnxruntime-gpu"]
    assert [r.name for r in runtimes if r.marker.evaluate(platforms[3])] == ["onnxruntime"]
