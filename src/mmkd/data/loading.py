"""Decode a manifest's files into tensors once, with a cache keyed by content.

Every row's files are decoded and checked before any training starts; a file that is
missing or does not decode stops the run with the row id, the path and the reason.
The decoded tensors are cached, so later stages and later runs decode no file again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmkd.config import DataConfig, input_names
from mmkd.data.decode import decode_audio, decode_image
from mmkd.errors import DataError
from mmkd.manifest import Manifest, label_order, read_manifest
from mmkd.runs import atomic_torch_save

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
# Files per message between a decoding worker and the calling process.
DECODE_BATCH = 32


@dataclass
class TensorDataset:
    """Decoded rows: one input tensor per modality, the modality mask, labels and splits.

    Attributes:
        inputs: model input name -> tensor with rows first (images and waveforms float,
            token ids and attention masks int64), named as in `MODEL_INPUTS`.
        mask: (rows, modalities) bool, True where the row has that modality.
        labels: (rows,) class indices into `classes`.
        ids: row ids, as in the manifest.
        splits: "train", "val" or "test" per row.
        keys: per-row content hash of the decoded inputs, used by the feature store.
        classes: class labels in output order.
        modalities: modality names in input order.
    """

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    splits: list[str]
    keys: list[str]
    classes: list[str]
    modalities: list[str]
    preprocessing: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, split: str) -> TensorDataset:
        """Return the rows of one split, in manifest order."""
        index = [i for i, s in enumerate(self.splits) if s == split]
        return self.take(index)

    def take(self, index: list[int]) -> TensorDataset:
        """Return the rows at `index`."""
        rows = torch.as_tensor(index, dtype=torch.long)
        return TensorDataset(
            inputs={m: x[rows] for m, x in self.inputs.items()},
            mask=self.mask[rows],
            labels=self.labels[rows],
            ids=[self.ids[i] for i in index],
            splits=[self.splits[i] for i in index],
            keys=[self.keys[i] for i in index],
            classes=self.classes,
            modalities=self.modalities,
            preprocessing=self.preprocessing,
        )

    def with_modalities(self, modalities: list[str]) -> TensorDataset:
        """Return the same rows with only `modalities`' inputs and mask columns, in that order.

        Row keys stay those of the full rows, so outputs a teacher computed on every
        modality are found for a student that reads fewer.
        """
        if list(modalities) == self.modalities:
            return self
        columns = [self.modalities.index(m) for m in modalities]
        return replace(self, inputs={name: self.inputs[name] for name in input_names(modalities)},
                       mask=self.mask[:, columns], modalities=list(modalities))

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        """Return the tensors in the model's positional order: each modality's inputs, then mask."""
        return (*(self.inputs[name] for name in input_names(self.modalities)), self.mask)


def _source_key(manifest: Manifest, data: DataConfig) -> str:
    """Hash the manifest bytes, every named file's size and mtime, and the preprocessing."""
    digest = hashlib.sha256(manifest.path.read_bytes())
    settings = data.model_dump(mode="json", exclude={"decode_workers"})
    digest.update(json.dumps([CACHE_FORMAT, settings], sort_keys=True).encode())
    for modality in ("image", "audio"):
        if modality not in manifest.frame.columns:
            continue
        for value in manifest.frame[modality]:
            if value is None:
                continue
            try:
                stat = manifest.resolve(value).stat()
                digest.update(f"{value}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"{value}:missing".encode())
    return digest.hexdigest()[:24]


def _read(data: DataConfig) -> Manifest:
    """Read the config's manifest, cut to `data.max_rows` when set."""
    manifest = read_manifest(
        data.manifest, modalities=data.modalities, split_fractions=data.split_fractions, root=data.root
    )
    if data.max_rows is None:
        return manifest
    return Manifest(
        path=manifest.path,
        root=manifest.root,
        frame=manifest.frame.iloc[: data.max_rows].reset_index(drop=True),
        modalities=manifest.modalities,
        split_assigned=manifest.split_assigned,
    )


def decode_to_cache(data: DataConfig, cache_dir: Path) -> Path:
    """Decode every row into a tensor file under `cache_dir`, unless an up-to-date one exists; return its path.

    Raises:
        DataError: a file is missing or does not decode; the message names the row id,
            the manifest, the path and the reason.
    """
    manifest = _read(data)
    cache_path = Path(cache_dir) / f"tensors-{_source_key(manifest, data)}.pt"
    if cache_path.exists():
        logger.info("Reusing decoded tensors from %s", cache_path)
        return cache_path
    atomic_torch_save(cache_path, _decode(manifest, data).__dict__)
    return cache_path


def load_decoded(path: Path, *, mmap: bool = False) -> TensorDataset:
    """Load a tensor file that `decode_to_cache` wrote; with `mmap`, tensors are read from disk as they are used."""
    return TensorDataset(**torch.load(path, weights_only=True, mmap=mmap))


def load_dataset(data: DataConfig, *, cache_dir: Path | None = None) -> TensorDataset:
    """Read the manifest and decode every row, or reuse the cached tensors.

    Raises:
        DataError: a file is missing or does not decode; the message names the row id,
            the manifest, the path and the reason.
    """
    if cache_dir is None:
        return _decode(_read(data), data)
    return load_decoded(decode_to_cache(data, cache_dir))


def _decode(manifest: Manifest, data: DataConfig) -> TensorDataset:
    frame = manifest.frame
    labels_text = [str(v) for v in frame["label"]]
    classes = list(data.classes) if data.classes is not None else sorted(set(labels_text), key=label_order)
    unknown = sorted(set(labels_text) - set(classes))
    if unknown:
        raise DataError(
            f"{manifest.path}: labels {unknown} are not in data.classes {classes}. "
            "Add them to data.classes or remove those rows."
        )
    class_index = {c: i for i, c in enumerate(classes)}
    empty = {"image": np.zeros((data.image.channels, data.image.size, data.image.size), np.float32),
             "audio": np.zeros(data.audio.num_samples, np.float32)}

    # Every image and recording in row order, decoded ahead of the loop below that consumes them.
    files = [(modality, manifest.resolve(value)) for row in frame.itertuples(index=False) for modality in data.modalities
             if modality != "text" and (value := getattr(row, modality, None)) is not None]
    decoded = _decode_files(files, data)

    arrays: dict[str, list[np.ndarray]] = {m: [] for m in data.modalities if m != "text"}
    texts: list[str] = []
    mask = np.zeros((len(frame), len(data.modalities)), dtype=bool)
    digests = []
    for row_number, row in enumerate(frame.itertuples(index=False)):
        digest = hashlib.sha256()
        digests.append(digest)
        for j, modality in enumerate(data.modalities):
            value = getattr(row, modality, None)
            if modality == "text":
                # Texts are tokenized together below; their token ids enter the key there.
                texts.append("" if value is None else str(value))
                mask[row_number, j] = value is not None
                continue
            if value is None:
                arrays[modality].append(empty[modality])
                digest.update(f"{modality}:absent".encode())
                continue
            array, problem = next(decoded)
            if problem is not None:
                raise DataError(_row_message(manifest, row_number, str(row.id), modality, manifest.resolve(value), problem))
            arrays[modality].append(array)
            mask[row_number, j] = True
            digest.update(modality.encode())
            digest.update(array.tobytes())

    inputs = {m: torch.from_numpy(np.stack(arrays[m])) for m in arrays}
    preprocessing = {"image": data.image.model_dump(), "audio": data.audio.model_dump()}
    if "text" in data.modalities:
        column = data.modalities.index("text")
        inputs.update(tokenize(texts, data))
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        for digest, ids, length, present in zip(digests, inputs["input_ids"].numpy(), lengths, mask[:, column], strict=True):
            # Only the row's own tokens: padding depends on the longest row, which appended rows change.
            digest.update(b"text" + ids[:length].tobytes() if present else b"text:absent")
        preprocessing["text"] = {"tokenizer": data.text.tokenizer, "max_length": data.text.max_length}
    keys = [digest.hexdigest()[:32] for digest in digests]
    logger.info("Decoded %d rows (%s) from %s", len(frame), ", ".join(data.modalities), manifest.path)
    return TensorDataset(
        inputs=inputs,
        mask=torch.from_numpy(mask),
        labels=torch.tensor([class_index[v] for v in labels_text], dtype=torch.long),
        ids=[str(v) for v in frame["id"]],
        splits=[str(v) for v in frame["split"]],
        keys=keys,
        classes=classes,
        modalities=list(data.modalities),
        preprocessing=preprocessing,
    )


def tokenize(texts: list[str], data: DataConfig) -> dict[str, torch.Tensor]:
    """Tokenize `texts` with the config's tokenizer, padded to the longest and cut to `data.text.max_length`.

    The tokenizer is read from its folder or the Hugging Face cache, never downloaded
    here: a run that allows downloads fetches it first (`mmkd.models.text.prefetch`).

    Returns:
        "input_ids" and "attention_mask", each (rows, tokens) int64.
    """
    from mmkd.models.text import load_tokenizer

    tokenizer = load_tokenizer(data.text.tokenizer, allow_downloads=False)
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=data.text.max_length, return_tensors="np")
    return {name: torch.from_numpy(encoded[name].astype(np.int64)) for name in ("input_ids", "attention_mask")}


class _FileDecoding(torch.utils.data.Dataset):
    """The files of a manifest as a map-style dataset, so DataLoader workers can decode them in parallel.

    Item i is (array, None) when file i decodes, else (None, the reason it does not), so that
    the calling process raises the error with the row it belongs to.
    """

    def __init__(self, files: list[tuple[str, Path]], data: DataConfig) -> None:
        self.files = files
        self.data = data

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str | None]:
        modality, path = self.files[index]
        try:
            if modality == "image":
                return decode_image(path, self.data.image), None
            return decode_audio(path, self.data.audio), None
        except FileNotFoundError:
            return None, "the file does not exist"
        except (OSError, ValueError, EOFError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            return None, f"it does not decode: {exc}"


def _as_list(items: list) -> list:
    return items


def _decode_files(files: list[tuple[str, Path]], data: DataConfig) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Decode `files` in order, in `data.decode_workers` DataLoader worker processes (none: in this one)."""
    decoding = _FileDecoding(files, data)
    if data.decode_workers == 0 or not files:
        yield from (decoding[i] for i in range(len(decoding)))
        return
    # Files go to and from the workers DECODE_BATCH at a time, which keeps the messages few.
    loader = torch.utils.data.DataLoader(
        decoding, batch_size=DECODE_BATCH, collate_fn=_as_list, num_workers=data.decode_workers,
    )
    for batch in loader:
        yield from batch


def _row_message(manifest: Manifest, row_number: int, row_id: str, column: str, path: Path, reason: str) -> str:
    return (
        f"{manifest.path}, row {row_number + 1} (id {row_id!r}), column {column!r}: {path} cannot be used "
        f"because {reason}. Fix or replace the file, or remove the row from the manifest."
    )
