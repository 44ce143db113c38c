"""Probe each manifest row's files and text into one flat record of facts.

A probe never raises on a bad file. A file that is missing, unreadable or does not
decode becomes facts (`<m>_exists`, `<m>_decodes`, ...) plus a short reason in
`<m>_error`, so one run reports every problem of a manifest at once. Files are hashed and
decoded in blocks, and `probe_manifest` holds a bounded number of row chunks in flight,
so memory does not grow with the manifest or with the size of one file.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import posixpath
import re
import stat
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from mmkd.config import ImageConfig
from mmkd.data import wav
from mmkd.manifest import Manifest, is_utf8
from mmkd.runs import atomic_write, sha256_of_file

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS: int = ImageConfig.model_fields["max_pixels"].default
"""Default pixel limit: images whose header declares more are reported, never decoded."""

SILENCE_PEAK = 1e-4
"""A recording whose peak absolute sample is below this counts as silent."""

_FILE_FIELDS = ("path", "exists", "inside_root", "bytes", "decodes", "error", "sha256")
_IMAGE_FIELDS = ("width", "height", "mode", "channels", "format")
_AUDIO_FIELDS = (
    "sample_rate_hz", "channels", "bit_depth", "encoding",
    "duration_s", "peak", "silent", "nonfinite",
)
_TEXT_FIELDS = ("chars", "tokens", "blank", "utf8", "sha256")

PROBE_COLUMNS: tuple[str, ...] = (
    "row_number", "id", "label", "split", "has_image", "has_audio", "has_text",
    *(f"image_{name}" for name in _FILE_FIELDS + _IMAGE_FIELDS),
    *(f"audio_{name}" for name in _FILE_FIELDS + _AUDIO_FIELDS),
    *(f"text_{name}" for name in _TEXT_FIELDS),
)

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class _BadFile(Exception):
    """A file that does not decode, with a reason for the probe record."""


def probe_row(
    row: Mapping[str, Any],
    *,
    root: Path,
    row_number: int,
    modalities: Sequence[str],
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Probe one manifest row's files and text without raising on bad data.

    Args:
        row: The row's cells: `id`, `label`, `split` and the modality columns.
        root: Folder that relative paths are resolved against. Files outside it are
            never opened.
        row_number: 1-based number of the row among the manifest's data rows.
        modalities: Modality columns to probe. Fields of any other modality are None.
        max_image_pixels: Images whose header declares more pixels are not decoded.

    Returns:
        A dict with exactly the keys of `PROBE_COLUMNS`.
    """
    record: dict[str, Any] = dict.fromkeys(PROBE_COLUMNS)
    record.update(row_number=row_number, id=_cell(row.get("id")), label=_cell(row.get("label")))
    record["split"] = _cell(row.get("split"))
    for modality in ("image", "audio"):
        value = _cell(row.get(modality)) if modality in modalities else None
        present = value is not None and value.strip() != ""
        record[f"has_{modality}"] = present
        if present:
            record.update(_probe_file(modality, value, root, max_image_pixels))
    text = _cell(row.get("text")) if "text" in modalities else None
    record["has_text"] = text is not None
    if text is not None:
        record.update(
            text_chars=len(text),
            text_tokens=len(text.split()),
            text_blank=not text.strip(),
            text_utf8=is_utf8(text),
            text_sha256=hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        )
    return record


def probe_manifest(
    manifest: Manifest, *, workers: int = 2, chunk_rows: int = 256, max_image_pixels: int = MAX_IMAGE_PIXELS
) -> Iterator[dict[str, Any]]:
    """Probe every row of a manifest in parallel and yield the records in manifest order.

    Rows go to a thread pool in chunks, and at most `workers + 1` chunks are submitted
    but not yet yielded, so memory stays near `(workers + 1) * chunk_rows` records.

    NOTE: small files make the probe bound by the GIL, so a second thread gains little.
    On the 2,500-row avdigits data on a shared 2-core machine, one thread took 0.6 s and
    two threads 0.6 to 1.2 s. A fork-started process pool took 0.33 to 0.6 s, but forking
    a process that runs Prefect's threads can deadlock, and spawn or forkserver pools took
    0.7 to 0.9 s because each worker imports pandas first. Threads are used for safety.

    Args:
        manifest: The manifest to probe.
        workers: Threads that probe chunks at the same time.
        chunk_rows: Rows per chunk handed to one thread.
        max_image_pixels: Images whose header declares more pixels are not decoded.

    Raises:
        ValueError: `workers` or `chunk_rows` is below 1.
    """
    if workers < 1 or chunk_rows < 1:
        raise ValueError(f"workers and chunk_rows must be at least 1, got {workers} and {chunk_rows}")
    frame = manifest.frame
    started = time.perf_counter()
    failures = 0
    pending: deque[Future[list[dict[str, Any]]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmkd-probe") as pool:
        for start in range(0, len(frame), chunk_rows):
            rows = frame.iloc[start : start + chunk_rows].to_dict(orient="records")
            pending.append(pool.submit(_probe_chunk, rows, manifest.root, start + 1, manifest.modalities, max_image_pixels))
            if len(pending) > workers:
                for record in pending.popleft().result():
                    failures += _has_failure(record)
                    yield record
        while pending:
            for record in pending.popleft().result():
                failures += _has_failure(record)
                yield record
    elapsed = time.perf_counter() - started
    logger.info(
        "Probed %d rows of %s in %.2f s with %d workers; %d rows have a file problem",
        len(frame), manifest.path, elapsed, workers, failures,
    )


def write_probe_table(records: Iterable[dict[str, Any]], path: Path) -> int:
    """Stream probe records to a CSV file with `PROBE_COLUMNS` as header, atomically.

    None is written as an empty cell. The rows go to a temporary file in the same folder,
    which replaces `path` only when every record is written.

    Returns:
        The number of data rows written.

    Raises:
        ValueError: A record has a key that is not in `PROBE_COLUMNS`. `path` is then
            left as it was.
    """
    count = 0

    def write(temporary: Path) -> None:
        nonlocal count
        # Ids and paths that were not UTF-8 in the manifest round-trip as the same bytes.
        with open(temporary, "w", encoding="utf-8", errors="surrogateescape", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=PROBE_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for record in records:
                writer.writerow(record)
                count += 1
            stream.flush()
            os.fsync(stream.fileno())

    atomic_write(Path(path), write)
    return count


def _probe_chunk(
    rows: list[dict[str, Any]], root: Path, first_row_number: int, modalities: Sequence[str], max_image_pixels: int
) -> list[dict[str, Any]]:
    return [
        probe_row(
            row, root=root, row_number=first_row_number + i, modalities=modalities, max_image_pixels=max_image_pixels
        )
        for i, row in enumerate(rows)
    ]


def _has_failure(record: Mapping[str, Any]) -> bool:
    return record["image_error"] is not None or record["audio_error"] is not None


def _cell(value: Any) -> str | None:
    """Return a cell as text, or None when it is missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _inside_root(value: str, root: Path) -> bool:
    """Tell whether a path cell names a file inside `root`, following symlinks."""
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).anchor:
        return False
    normal = posixpath.normpath(value.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        return False
    resolved_root = root.resolve()
    return (resolved_root / value).resolve().is_relative_to(resolved_root)


def _probe_file(modality: str, value: str, root: Path, max_image_pixels: int) -> dict[str, Any]:
    facts: dict[str, Any] = {"path": value, "decodes": False}
    reason = _check_file(value, root, facts)
    if reason is None:
        reason = _decode_file(modality, root / value, facts, max_image_pixels)
    if reason is not None:
        facts["error"] = reason
        logger.debug("Row file %s (%s) is invalid: %s", value, modality, reason)
    return _prefixed(modality, facts)


def _check_file(value: str, root: Path, facts: dict[str, Any]) -> str | None:
    """Fill the location, size and hash facts of one file, and return why it is unusable, if it is."""
    try:
        facts["inside_root"] = _inside_root(value, root)
    except (OSError, RuntimeError, ValueError) as error:
        # A symlink loop raises RuntimeError, and a NUL in the path raises ValueError.
        return f"cannot resolve the path: {error}"
    if not facts["inside_root"]:
        # Not even stat() is called, so the record reveals nothing about files outside the root.
        return "path escapes the data root"

    path = root / value
    try:
        status = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        facts["exists"] = False
        return "file not found"
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"
    facts["exists"] = True
    if not stat.S_ISREG(status.st_mode):
        return "not a regular file"
    facts["bytes"] = status.st_size
    try:
        facts["sha256"] = sha256_of_file(path)
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"
    if status.st_size == 0:
        return "the file is empty"
    return None


def _decode_file(modality: str, path: Path, facts: dict[str, Any], max_image_pixels: int) -> str | None:
    """Decode one file, filling the modality's facts, and return why it does not decode, if it does not."""
    try:
        if modality == "image":
            _probe_image(path, facts, max_image_pixels)
        else:
            _probe_audio(path, facts)
    except (_BadFile, wav.WavError) as error:
        return str(error)
    # Decoders of untrusted files raise many exception types (OSError, SyntaxError,
    # struct.error, ...), and one bad file must not stop the probe of the others.
    except Exception as error:  # noqa: BLE001
        return f"does not decode: {type(error).__name__}: {error}"
    facts["decodes"] = True
    return None


def _prefixed(modality: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{modality}_{key}": value for key, value in facts.items()}


def _probe_image(path: Path, facts: dict[str, Any], max_pixels: int) -> None:
    """Read an image's header into `facts`, check its pixel count, then decode every pixel."""
    with open(path, "rb") as stream:
        _decode_image(stream, facts, max_pixels)


def _decode_image(stream: BinaryIO, facts: dict[str, Any], max_pixels: int) -> None:
    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as error:
        # PIL rejects images above twice its own limit before returning the size, so
        # the pixel count comes from its message.
        found = _BOMB_PIXELS.search(str(error))
        if found and int(found.group(1)) > max_pixels:
            raise _BadFile(
                f"image declares {found.group(1)} pixels, above the limit of {max_pixels}; not decoded"
            ) from None
        # A caller lowered PIL.Image.MAX_IMAGE_PIXELS below this module's limit.
        raise _BadFile(f"PIL rejects the image as a decompression bomb: {error}") from None
    except Image.UnidentifiedImageError:
        raise _BadFile("not an image in a format PIL recognises") from None

    with image:
        width, height = image.size
        facts.update(
            width=width, height=height, mode=image.mode,
            channels=len(image.getbands()), format=image.format,
        )
        # The pixel count is checked from the header, before load() allocates the pixels.
        # Above PIL's own warning limit (89,478,485 pixels by default in Pillow 13),
        # Image.open has already issued a DecompressionBombWarning, and this check rejects
        # the image as well.
        if width * height > max_pixels:
            raise _BadFile(
                f"image declares {width}x{height} = {width * height} pixels, above the limit "
                f"of {max_pixels}; not decoded"
            )
        # NOTE: a caller that sets PIL.ImageFile.LOAD_TRUNCATED_IMAGES makes truncated
        # images decode here without an error.
        try:
            image.load()
        except OSError as error:
            raise _BadFile(f"image data does not decode: {error}") from None


def _probe_audio(path: Path, facts: dict[str, Any]) -> None:
    """Read a WAV header into `facts`, check the data chunk's length, then scan every sample."""
    with open(path, "rb") as stream:
        header = wav.read_header(stream)
    facts.update(
        sample_rate_hz=header.sample_rate_hz, channels=header.channels, bit_depth=header.bits,
        encoding=header.encoding, duration_s=header.duration_s,
    )
    wav.check_complete(header)
    peak, nonfinite = 0.0, 0
    for block in wav.iter_blocks(path, header):
        finite = np.isfinite(block)
        nonfinite += int(block.size - np.count_nonzero(finite))
        if finite.any():
            peak = max(peak, float(np.abs(block[finite]).max()))
    facts.update(peak=peak, silent=peak < SILENCE_PEAK, nonfinite=nonfinite)
