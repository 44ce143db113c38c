"""Predictions from raw files with an exported student, using only ONNX Runtime, numpy and PIL.

The model file carries everything prediction needs in its metadata: the labels, the
modalities it takes and their preprocessing. Neither torch nor Prefect is imported here,
so a serving environment needs only `onnxruntime`, `numpy`, `pillow`, `pandas`,
`pydantic` and `pyyaml` besides mmkd.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.config import AudioConfig, ImageConfig, modalities_of
from mmkd.data.decode import decode_audio, decode_image
from mmkd.errors import ConfigError, DataError

# Paths of the student inside a model folder, most specific first.
MODEL_CANDIDATES = ("model_repository/student/1/model.onnx", "student/1/model.onnx", "1/model.onnx", "student.onnx", "model.onnx")
BATCH_SIZE = 64


def find_model(path: Path) -> Path:
    """Return the ONNX file at `path`, or the student inside a run folder or model repository.

    Raises:
        ConfigError: no model is there; the message lists where it looked.
    """
    path = Path(path)
    if path.is_file():
        return path
    for candidate in MODEL_CANDIDATES:
        if (path / candidate).is_file():
            return path / candidate
    raise ConfigError(f"No ONNX model at {path}: looked for the file itself and {', '.join(MODEL_CANDIDATES)} inside it. "
                      "Pass a run folder, a Triton model folder or an .onnx file.")


def _known(settings: type, stored: dict):
    """Build `settings` from stored preprocessing, ignoring keys that older mmkd versions also stored."""
    return settings(**{key: value for key, value in stored.items() if key in settings.model_fields})


@dataclass
class Student:
    """An exported student and the preprocessing its metadata describes."""

    session: object
    labels: list[str]
    modalities: list[str]
    image: ImageConfig | None
    audio: AudioConfig | None
    tokenizer: object = None

    @property
    def inputs(self) -> list[str]:
        """The model's input names other than the modality mask."""
        return [i.name for i in self.session.get_inputs() if i.name != "mask"]  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: Path) -> Student:
        import onnxruntime as ort

        model_path = find_model(path)
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        metadata = session.get_modelmeta().custom_metadata_map
        missing = [key for key in ("labels", "preprocessing") if key not in metadata]
        if missing:
            raise ConfigError(f"{model_path} has no {' or '.join(missing)} in its metadata; export it with mmkd.")
        preprocessing = json.loads(metadata["preprocessing"])
        names = [i.name for i in session.get_inputs()]
        modalities = modalities_of(names)
        tokenizer = None
        if "text" in modalities:
            if "tokenizer" not in metadata:
                raise ConfigError(f"{model_path} takes text but has no tokenizer in its metadata; export it with mmkd.")
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(metadata["tokenizer"])
            tokenizer.enable_truncation(int(preprocessing["text"]["max_length"]))
            tokenizer.no_padding()
        return cls(
            session=session,
            labels=json.loads(metadata["labels"]),
            modalities=modalities,
            image=_known(ImageConfig, preprocessing["image"]) if "image" in modalities else None,
            audio=_known(AudioConfig, preprocessing["audio"]) if "audio" in modalities else None,
            tokenizer=tokenizer,
        )

    def _tokenize(self, texts: list[str | None]) -> dict[str, np.ndarray]:
        """Token ids and attention mask of `texts`, padded to the longest; a missing text is all padding."""
        encodings = [self.tokenizer.encode(text) if text is not None else None for text in texts]  # type: ignore[attr-defined]
        length = max([2, *(len(e.ids) for e in encodings if e is not None)])
        ids = np.zeros((len(texts), length), dtype=np.int64)
        attention = np.zeros((len(texts), length), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            if encoding is not None:
                ids[i, : len(encoding.ids)] = encoding.ids
                attention[i, : len(encoding.ids)] = 1
        return {"input_ids": ids, "attention_mask": attention}

    def _decode(self, modality: str, path: Path) -> np.ndarray:
        if modality == "image":
            return decode_image(path, self.image)
        if modality == "audio":
            return decode_audio(path, self.audio)
        raise ConfigError(f"this model takes {modality!r}, which mmkd predict cannot decode yet")

    def _empty(self, modality: str) -> np.ndarray:
        if modality == "image":
            return np.zeros((self.image.channels, self.image.size, self.image.size), np.float32)
        return np.zeros(self.audio.num_samples, np.float32)

    def predict(self, rows: list[dict[str, Path | None]], ids: list[str]) -> list[dict]:
        """Return one prediction per row: id, label and each label's probability.

        Each row maps a modality to its file (for text, the text itself), or to None where
        the row lacks it; the model's mask input marks which are absent.

        Raises:
            DataError: a file does not decode; the message names the row and the file.
        """
        results = []
        for start in range(0, len(rows), BATCH_SIZE):
            batch, batch_ids = rows[start : start + BATCH_SIZE], ids[start : start + BATCH_SIZE]
            feed: dict[str, list] = {m: [] for m in self.modalities}
            mask = np.zeros((len(batch), len(self.modalities)), dtype=bool)
            for i, (row, row_id) in enumerate(zip(batch, batch_ids, strict=True)):
                for j, modality in enumerate(self.modalities):
                    path = row.get(modality)
                    if modality == "text":
                        feed["text"].append(path)
                        mask[i, j] = path is not None
                        continue
                    if path is None:
                        feed[modality].append(self._empty(modality))
                        continue
                    try:
                        feed[modality].append(self._decode(modality, path))
                    except (OSError, ValueError, EOFError) as exc:
                        raise DataError(f"row {row_id!r}: {modality} {path} cannot be used: {exc}") from None
                    mask[i, j] = True
            inputs = {m: np.stack(arrays).astype(np.float32) for m, arrays in feed.items() if m != "text"}
            if "text" in feed:
                inputs.update(self._tokenize(feed["text"]))
            logits, _ = self.session.run(None, {**inputs, "mask": mask})
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)
            for row_id, row_probabilities in zip(batch_ids, probabilities, strict=True):
                results.append({
                    "id": row_id,
                    "label": self.labels[int(row_probabilities.argmax())],
                    "probabilities": {label: float(p) for label, p in zip(self.labels, row_probabilities, strict=True)},
                })
        return results


def manifest_rows(manifest: Path, modalities: list[str], *, root: Path | None = None) -> tuple[list[dict], list[str]]:
    """Read the ids and modality files of a manifest (a label column is optional).

    Raises:
        DataError: the manifest has no id column, none of the model's modalities, or a
            path outside its folder; the message names the row.
    """
    from mmkd.manifest import _READERS, _check_relative_path, _format_of

    manifest = Path(manifest).resolve()
    if not manifest.is_file():
        raise DataError(f"Manifest {manifest} not found. Check the path.")
    frame, where = _READERS[_format_of(manifest)](manifest)
    data_root = Path(root).resolve() if root is not None else manifest.parent
    present = [m for m in modalities if m in frame.columns]
    if "id" not in frame.columns or not present:
        raise DataError(f"Manifest {manifest} needs an id column and at least one of {', '.join(modalities)}; "
                        f"it has {', '.join(map(str, frame.columns))}.")
    rows, ids = [], []
    for i, record in enumerate(frame.to_dict("records")):
        row = {}
        for modality in present:
            value = record.get(modality)
            if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
                row[modality] = None
                continue
            if modality == "text":
                row[modality] = str(value)
                continue
            _check_relative_path(str(value), f"Manifest {manifest}, {where[i]}, column {modality!r}", data_root)
            row[modality] = data_root / str(value)
        rows.append(row)
        ids.append(str(record["id"]))
    return rows, ids


def format_predictions(predictions: list[dict], labels: list[str], kind: str) -> str:
    """Render predictions as JSON (a list of objects) or CSV (id, label, one probability column per label)."""
    if kind == "json":
        return json.dumps(predictions, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label", *(f"p_{label}" for label in labels)])
    for prediction in predictions:
        writer.writerow([prediction["id"], prediction["label"], *(f"{prediction['probabilities'][label]:.6g}" for label in labels)])
    return buffer.getvalue()
