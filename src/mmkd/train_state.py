"""The resumable state of one training stage, saved so that a killed stage continues where it was.

A stage's state file contains everything the next step depends on. That is the weights
of the model and of any module trained with it, the optimiser, the schedule, the gradient
scaler and the weight average. It also has every random number generator, the position
(epoch and step), the history so far and the best epoch's weights. It is written to a temporary file, synced
to disk and renamed over the previous one, so a kill at any moment leaves either the old
state or the new one, never a torn file. It is read with `weights_only=True`: loading a
state file runs no code from it.

The file is only for resuming. The model a stage produces is saved separately, without
the optimiser, by mmkd.checkpoints.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkd.runs import atomic_torch_save

logger = logging.getLogger(__name__)

FORMAT = "mmkd-training-state/1"


class StateMismatchError(RuntimeError):
    """A state file exists but was written for another stage or config."""


class TrainingState:
    """The state file of one stage in one run folder: `<folder>/state.pt`.

    Args:
        folder: Where the stage keeps its state, e.g. `<run>/checkpoints/distill`.
        stage: The stage's name; a state of another stage is rejected.
        config_hash: Fingerprint of the config the stage runs with; a state written
            under another one is rejected, since resuming it would mix two configs.
    """

    def __init__(self, folder: Path, *, stage: str, config_hash: str):
        self.folder, self.stage, self.config_hash = Path(folder), stage, config_hash

    @property
    def path(self) -> Path:
        return self.folder / "state.pt"

    def load(self) -> dict[str, Any] | None:
        """Return the saved state, or None when the stage has not saved one yet."""
        # A process killed while saving leaves its temporary file behind. The state it was replacing is intact.
        for leftover in self.folder.glob(f".{self.path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise StateMismatchError(
                f"{self.path} cannot be read as a training state ({error}); delete it to start stage "
                f"{self.stage} over"
            ) from error
        found = (state.get("format"), state.get("stage"), state.get("config_hash"))
        if found[0] != FORMAT or found[1] != self.stage:
            raise StateMismatchError(
                f"{self.path} is not a {self.stage} training state of this mmkd (format {found[0]!r}, stage "
                f"{found[1]!r}); delete it to start the stage over"
            )
        if found[2] != self.config_hash:
            raise StateMismatchError(
                f"{self.path} was saved by a {self.stage} stage whose config had fingerprint {found[2][:12]}, but "
                f"this run's config has {self.config_hash[:12]}. Resuming would mix two configs, so put the run's "
                "config.yaml back as it was, or delete the file to start the stage over"
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Replace the state file with `state`, atomically and synced to disk."""
        atomic_torch_save(self.path, {"format": FORMAT, "stage": self.stage, "config_hash": self.config_hash, **state})

    def discard(self) -> None:
        """Remove the state once the stage's model is saved; a finished stage needs no resuming."""
        shutil.rmtree(self.folder, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    """Return the state of every random number generator training draws from, as tensors and plain values."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back to the state `capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
