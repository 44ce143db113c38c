"""The feature store: teacher outputs cached on disk, keyed by row content and teacher.

Each teacher fingerprint gets its own folder; each extraction writes one shard file of
(keys, logits, embeddings). A row whose decoded content and teacher are unchanged is
never run through the teacher again, whichever run or manifest it comes from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmkd.runs import atomic_torch_save

logger = logging.getLogger(__name__)


class FeatureStore:
    """Cached teacher logits and fused embeddings for one teacher fingerprint.

    Args:
        root: Folder shared by every teacher's cache.
        teacher_fingerprint: Hash of the teacher's weights and architecture.
    """

    def __init__(self, root: Path, teacher_fingerprint: str) -> None:
        self.folder = Path(root) / teacher_fingerprint
        self._index: dict[str, tuple[int, int]] = {}
        self._shards: list[dict[str, torch.Tensor]] = []
        self._load()

    def _load(self) -> None:
        for shard_path in sorted(self.folder.glob("shard-*.pt")):
            shard = torch.load(shard_path, map_location="cpu", weights_only=True)
            number = len(self._shards)
            self._shards.append({"logits": shard["logits"], "embeddings": shard["embeddings"]})
            for position, key in enumerate(shard["keys"]):
                self._index.setdefault(key, (number, position))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: list[str]) -> list[int]:
        """Return the positions in `keys` that have no stored outputs."""
        return [i for i, key in enumerate(keys) if key not in self._index]

    def add(self, keys: list[str], logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Store the outputs of new rows as one more shard file, written atomically."""
        if not keys:
            return
        number = len(self._shards)
        payload = {"keys": list(keys), "logits": logits.float().contiguous(), "embeddings": embeddings.float().contiguous()}
        atomic_torch_save(self.folder / f"shard-{number:05d}.pt", payload)
        self._shards.append({"logits": payload["logits"], "embeddings": payload["embeddings"]})
        for position, key in enumerate(keys):
            self._index.setdefault(key, (number, position))

    def get(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return stored (logits, embeddings) for `keys`, in order.

        Raises:
            KeyError: some keys were never extracted; run the extract flow first.
        """
        missing = self.missing(keys)
        if missing:
            raise KeyError(f"{len(missing)} rows have no teacher outputs in {self.folder}; run the extract stage first")
        logits = torch.stack([self._shards[s]["logits"][p] for s, p in (self._index[k] for k in keys)])
        embeddings = torch.stack([self._shards[s]["embeddings"][p] for s, p in (self._index[k] for k in keys)])
        return logits, embeddings
