"""Reuse of pipeline stages whose inputs did not change.

Each stage has a key: the sha256 of the stage's name, mmkd's version, the config
sections the stage reads, the keys of the stages it depends on and, for validation, the
content fingerprint of the dataset. A finished stage records its result and the sha256 of
the files it wrote under `<out>/stage-cache/<stage>/<key>.json`. A later run with the same
key copies those files from the earlier run folder into its own, after checking that they
are still there and unchanged, and skips the stage. Changing one config section therefore
re-runs the stages that read it and everything after them, and nothing before.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from mmkd import __version__
from mmkd.config import RunConfig
from mmkd.runs import atomic_write_json, sha256_of_file
from mmkd.watching import load_state, save_state, snapshot_dataset

# stage -> (config sections it reads, stages whose outputs it reads)
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "validate": (("data", "validation"), ()),
    "teacher": (("data", "teacher", "seed", "device", "precision", "channels_last", "compile", "augment"), ("validate",)),
    "distill": (("student", "extract", "distill", "seed", "device", "precision", "channels_last", "compile", "augment"),
                ("validate", "teacher")),
    "finetune": (("finetune",), ("distill",)),
    "evaluate": (("student", "distill", "finetune"), ("finetune", "teacher")),
    "export": (("export",), ("finetune", "teacher")),
    "benchmark": (("benchmark",), ("export",)),
}

# Files and folders each stage writes into the run folder.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "validate": ("validation",),
    "teacher": ("teacher.pt", "tensorboard/teacher"),
    "distill": ("student_distilled.pt", "tensorboard/distill"),
    "finetune": ("student.pt", "tensorboard/finetune"),
    "evaluate": ("baseline.pt", "tensorboard/baseline"),
    "export": ("student.onnx", "teacher.onnx", "variants", "model_repository"),
    "benchmark": ("benchmark.json", "benchmark.md", "latency.svg"),
}


def dataset_fingerprint(config: RunConfig, state_dir: Path) -> str:
    """Fingerprint the config's manifest and files, reading only files whose size or mtime changed."""
    name = hashlib.sha256(str(config.data.manifest).encode()).hexdigest()[:16]
    state_path = Path(state_dir) / f"{name}.json"
    snapshot = snapshot_dataset(config.data.manifest, root=config.data.root, previous=load_state(state_path))
    save_state(state_path, snapshot)
    return snapshot.fingerprint


def stage_keys(config: RunConfig, data_fingerprint: str) -> dict[str, str]:
    """Return each stage's cache key, in pipeline order."""
    dumped = config.result_settings()
    keys: dict[str, str] = {}
    for stage, (sections, upstream) in STAGE_INPUTS.items():
        inputs: dict[str, Any] = {
            "stage": stage,
            "mmkd": __version__,
            "config": {section: dumped[section] for section in sections},
            "after": {name: keys[name] for name in upstream},
        }
        if stage == "validate":
            inputs["data"] = data_fingerprint
        if stage == "teacher" and config.teacher.checkpoint is not None:
            inputs["checkpoint"] = sha256_of_file(config.teacher.checkpoint)
        if stage == "distill":
            inputs["extra_teachers"] = [sha256_of_file(t.checkpoint) for t in config.distill.extra_teachers]
        keys[stage] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return keys


def _output_files(run_dir: Path, outputs: tuple[str, ...]) -> list[Path]:
    """List the files a stage wrote, with folders expanded, relative to the run folder."""
    found = []
    for name in outputs:
        path = run_dir / name
        if path.is_dir():
            found += sorted(p.relative_to(run_dir) for p in path.rglob("*") if p.is_file())
        elif path.exists():
            found.append(Path(name))
    return found


class StageCache:
    """The record of finished stages under one output folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _entry(self, stage: str, key: str) -> Path:
        return self.folder / stage / f"{key}.json"

    def store(self, stage: str, key: str, run_dir: Path, result: Any) -> None:
        """Record a finished stage: its result and the hash of every file it wrote."""
        files = {str(rel): sha256_of_file(run_dir / rel) for rel in _output_files(run_dir, STAGE_OUTPUTS[stage])}
        atomic_write_json(self._entry(stage, key), {"run_dir": str(run_dir), "files": files, "result": result})

    def restore(self, stage: str, key: str, run_dir: Path) -> tuple[Any, Path] | None:
        """Copy a stage's files from the run that produced them; return (result, source run folder).

        Returns None, and copies nothing, when there is no record or a recorded file is
        gone or changed since.
        """
        entry_path = self._entry(stage, key)
        if not entry_path.exists():
            return None
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
        source = Path(entry["run_dir"])
        for rel, digest in entry["files"].items():
            if not (source / rel).is_file() or sha256_of_file(source / rel) != digest:
                return None
        for rel in entry["files"]:
            if source.resolve() == Path(run_dir).resolve():
                # A resumed run finds the stages it finished itself; their files are already in place.
                break
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, run_dir / rel)
        # Paths in the result name the earlier run's files; their copies are in this run.
        text = json.dumps(entry["result"]).replace(json.dumps(str(source))[1:-1], json.dumps(str(run_dir))[1:-1])
        return json.loads(text), source
