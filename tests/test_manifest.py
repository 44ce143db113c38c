"""Tests of manifest reading, validation, split assignment and writing."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from mmkd.errors import DataError
from mmkd.manifest import SPLITS, assign_split, read_manifest, write_manifest

CSV_TEXT = (
    "id,label,split,image,audio,text,speaker\n"
    "007,3,train,images/007.png,audio/007.wav,three,ann\n"
    "008,10,val,,audio/008.wav,ten,bob\n"
    "9,0,test,images/9.png,,,ann\n"
)
RECORDS = [
    {"id": "007", "label": 3, "split": "train", "image": "images/007.png",
     "audio": "audio/007.wav", "text": "three", "speaker": "ann"},
    {"id": "008", "label": 10, "split": "val", "image": None,
     "audio": "audio/008.wav", "text": "ten", "speaker": "bob"},
    {"id": "9", "label": 0, "split": "test", "image": "images/9.png",
     "audio": None, "text": None, "speaker": "ann"},
]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def plain_manifest(count: int, start: int = 0) -> str:
    lines = ["id,label,image"]
    lines += [f"row-{i},{i % 10},images/{i}.png" for i in range(start, start + count)]
    return "\n".join(lines) + "\n"


def test_csv_jsonl_and_parquet_read_identically(tmp_path: Path) -> None:
    from_csv = read_manifest(write_csv(tmp_path / "m.csv", CSV_TEXT))
    from_jsonl = read_manifest(write_jsonl(tmp_path / "m.jsonl", RECORDS))
    # Parquet keeps the labels as integers, which must still come out as text.
    pd.DataFrame(RECORDS).to_parquet(tmp_path / "m.parquet", index=False)
    from_parquet = read_manifest(tmp_path / "m.parquet")

    pd.testing.assert_frame_equal(from_csv.frame, from_jsonl.frame)
    pd.testing.assert_frame_equal(from_csv.frame, from_parquet.frame)
    assert from_csv.frame["id"].tolist() == ["007", "008", "9"]
    assert from_csv.frame["label"].tolist() == ["3", "10", "0"]
    assert from_csv.modalities == ("image", "audio", "text")
    assert from_csv.split_assigned is False


def test_ids_and_labels_stay_strings(tmp_path: Path) -> None:
    manifest = read_manifest(write_csv(tmp_path / "m.csv", "id,label,text\n007,3,a\n010,NA,b\n"))

    assert manifest.frame["id"].tolist() == ["007", "010"]
    assert manifest.frame["label"].tolist() == ["3", "NA"]
    assert all(isinstance(value, str) for value in manifest.frame["label"])


def test_missing_modality_is_none(tmp_path: Path) -> None:
    manifest = read_manifest(write_csv(tmp_path / "m.csv", CSV_TEXT))
    rows = manifest.frame.set_index("id")

    assert rows.loc["008", "image"] is None
    assert rows.loc["9", "audio"] is None
    assert rows.loc["9", "text"] is None
    assert rows.loc["007", "text"] == "three"


def test_extra_columns_are_kept(tmp_path: Path) -> None:
    manifest = read_manifest(write_csv(tmp_path / "m.csv", CSV_TEXT))

    assert manifest.frame["speaker"].tolist() == ["ann", "bob", "ann"]
    assert list(manifest.frame.columns) == [
        "id", "label", "split", "image", "audio", "text", "speaker",
    ]


def test_manifest_resolves_paths_and_selects_splits(tmp_path: Path) -> None:
    manifest = read_manifest(write_csv(tmp_path / "m.csv", CSV_TEXT))

    assert manifest.path == (tmp_path / "m.csv").resolve()
    assert manifest.root == tmp_path.resolve()
    assert manifest.resolve("images/007.png") == tmp_path.resolve() / "images" / "007.png"
    assert manifest.rows("val")["id"].tolist() == ["008"]
    assert len(manifest.rows()) == len(manifest) == 3
    with pytest.raises(DataError, match=r"Unknown split 'dev'\. Valid splits: train, val, test"):
        manifest.rows("dev")


def test_required_modalities_must_all_be_present(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,image\na,1,x.png\n")

    assert read_manifest(path, modalities=["image"]).modalities == ("image",)
    with pytest.raises(DataError, match=r"missing modality column\(s\) audio, text"):
        read_manifest(path, modalities=["image", "audio", "text"])


def test_appended_rows_keep_their_split(tmp_path: Path) -> None:
    before = read_manifest(write_csv(tmp_path / "a.csv", plain_manifest(200)))
    after = read_manifest(write_csv(tmp_path / "b.csv", plain_manifest(300)))

    assert before.split_assigned is True
    assert after.frame["split"].tolist()[:200] == before.frame["split"].tolist()
    assert set(after.frame["split"]) == set(SPLITS)


def test_split_fractions_are_roughly_respected() -> None:
    fractions = {"train": 0.6, "val": 0.1, "test": 0.3}
    counts = Counter(assign_split(f"example-{i}", fractions) for i in range(5000))

    for name, fraction in fractions.items():
        assert abs(counts[name] / 5000 - fraction) < 0.03, (name, counts)


def test_default_split_fractions_apply_when_none_given(tmp_path: Path) -> None:
    manifest = read_manifest(write_csv(tmp_path / "m.csv", plain_manifest(5000)))
    shares = manifest.frame["split"].value_counts(normalize=True)

    assert abs(shares["train"] - 0.7) < 0.03
    assert abs(shares["val"] - 0.15) < 0.03
    assert abs(shares["test"] - 0.15) < 0.03


def test_split_depends_on_salt_and_id_only() -> None:
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    ids = [f"id-{i}" for i in range(200)]
    plain = [assign_split(i, fractions) for i in ids]

    assert plain == [assign_split(i, fractions) for i in ids]
    assert plain != [assign_split(i, fractions, salt="other") for i in ids]
    assert {assign_split(i, {"val": 1.0}) for i in ids} == {"val"}


def test_empty_split_cells_are_assigned_from_the_id(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,split,text\na,1,test,x\nb,2,,y\n")
    manifest = read_manifest(path, split_fractions={"val": 1.0})

    assert manifest.frame["split"].tolist() == ["test", "val"]
    assert manifest.split_assigned is True


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ({"train": 0.7, "val": 0.2}, r"must sum to 1, but .* sums to 0\.9"),
        ({"train": 1.5, "val": -0.5}, r"'train' is 1\.5, but it must be a number in \[0, 1\]"),
        ({"train": 0.5, "dev": 0.5}, r"Unknown split name\(s\) in split fractions: 'dev'"),
    ],
)
def test_invalid_split_fractions_are_rejected(fractions: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        assign_split("a", fractions)


def test_missing_column_lists_found_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,image\na,x.png\n")

    with pytest.raises(
        DataError,
        match=r"m\.csv: missing required column\(s\) label\. Found columns: id, image\. "
        r"A manifest needs the columns id and label",
    ):
        read_manifest(path)


def test_manifest_without_modality_is_rejected(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,note\na,1,x\n")

    with pytest.raises(DataError, match=r"no modality column\. Found columns: id, label, note"):
        read_manifest(path)


def test_duplicate_id_names_both_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,text\na,1,x\nb,2,y\na,3,z\n")

    with pytest.raises(DataError, match=r"duplicate id 'a' on line 2 and line 4"):
        read_manifest(path)


def test_duplicate_id_in_parquet_names_row_numbers(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": ["a", "b", "a"], "label": ["1", "2", "3"], "text": "x"})
    frame.to_parquet(tmp_path / "m.parquet", index=False)

    with pytest.raises(DataError, match=r"duplicate id 'a' on row 1 and row 3"):
        read_manifest(tmp_path / "m.parquet")


def test_empty_label_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,text\na,1,x\nb,,y\n")

    with pytest.raises(DataError, match=r"m\.csv, line 3, column 'label': empty label"):
        read_manifest(path)


def test_invalid_split_value_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,split,text\na,1,train,x\nb,2,training,y\n")

    with pytest.raises(
        DataError,
        match=r"line 3, column 'split': invalid split 'training'\. Valid values: train, val, test",
    ):
        read_manifest(path)


def test_absolute_path_is_rejected(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,image\na,1,/data/a.png\n")

    with pytest.raises(
        DataError,
        match=r"line 2, column 'image': absolute path '/data/a\.png'\. Paths are relative "
        r"to the manifest folder",
    ):
        read_manifest(path)


def test_path_leaving_the_root_is_rejected(tmp_path: Path) -> None:
    text = "id,label,audio\na,1,sub/../ok.wav\nb,1,sub/../../x.wav\n"
    path = write_csv(tmp_path / "m.csv", text)

    with pytest.raises(
        DataError,
        match=r"line 3, column 'audio': path 'sub/\.\./\.\./x\.wav' leads outside the manifest",
    ):
        read_manifest(path)


def test_row_without_any_modality_is_rejected(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "id,label,image,text\na,1,a.png,\nb,2,,\n")

    with pytest.raises(
        DataError,
        match=r"line 3 \(id 'b'\): no modality, because the cells of image, text are all empty",
    ):
        read_manifest(path)


def test_unknown_extension_lists_supported_ones(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.tsv", "id\tlabel\ttext\n")

    with pytest.raises(
        DataError,
        match=r"unsupported file type \(\.tsv\)\. Supported: \.csv\.gz, \.csv, \.jsonl, "
        r"\.ndjson, \.parquet",
    ):
        read_manifest(path)


def test_line_numbers_count_quoted_line_breaks(tmp_path: Path) -> None:
    text = 'id,label,text\na,1,"first\nsecond"\n\nb,,x\n'

    with pytest.raises(DataError, match=r"line 5, column 'label': empty label"):
        read_manifest(write_csv(tmp_path / "m.csv", text))


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.ndjson"
    path.write_text('{"id": "a", "label": "1", "text": "x"}\n\n{"id": "b",\n', encoding="utf-8")

    with pytest.raises(DataError, match=r"m\.ndjson, line 3: invalid JSON"):
        read_manifest(path)


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.csv not found"):
        read_manifest(tmp_path / "absent.csv")


@pytest.mark.parametrize("name", ["out.csv", "out.csv.gz", "out.jsonl", "out.parquet"])
def test_written_manifest_reads_back_unchanged(tmp_path: Path, name: str) -> None:
    original = read_manifest(write_csv(tmp_path / "m.csv", CSV_TEXT)).frame

    written = write_manifest(original, tmp_path / name)

    pd.testing.assert_frame_equal(read_manifest(written).frame, original)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.csv", name])


def test_gzip_manifest_bytes_are_reproducible(tmp_path: Path) -> None:
    frame = read_manifest(write_csv(tmp_path / "m.csv", CSV_TEXT)).frame

    first = write_manifest(frame, tmp_path / "a" / "out.csv.gz").read_bytes()
    second = write_manifest(frame, tmp_path / "b" / "out.csv.gz").read_bytes()

    assert first == second
    assert gzip.decompress(first).decode("utf-8").splitlines()[1].startswith("007,3,train,")


def test_writing_to_unknown_extension_is_rejected(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": ["a"], "label": ["1"], "text": ["x"]})

    with pytest.raises(DataError, match=r"unsupported file type \(\.xlsx\)"):
        write_manifest(frame, tmp_path / "m.xlsx")
    assert list(tmp_path.iterdir()) == []


def test_csv_with_byte_order_mark_crlf_and_unicode_names_reads_cleanly(tmp_path):
    (tmp_path / "ñandú.png").write_bytes(b"")
    (tmp_path / "m.csv").write_bytes(
        "\ufeffid,label,image,notes\r\na,1,ñandú.png,first\r\nb,2,ñandú.png,second\r\n".encode("utf-8")
    )
    manifest = read_manifest(tmp_path / "m.csv")
    assert list(manifest.frame["id"]) == ["a", "b"]
    assert list(manifest.frame["image"]) == ["ñandú.png", "ñandú.png"]
    assert manifest.resolve("ñandú.png") == tmp_path / "ñandú.png"
    # An extra column is kept, not an error.
    assert list(manifest.frame["notes"]) == ["first", "second"]


BAD_ROWS_CSV = (
    "id,label,split,image,text\n"
    "a,1,train,images/a.png,\n"
    "a,2,train,images/b.png,\n"
    ",3,val,images/c.png,\n"
    "d,,test,images/d.png,\n"
    "e,5,training,images/e.png,\n"
    "f,6,,/etc/passwd,\n"
    "g,7,,../outside.png,\n"
    "h,8,,,\n"
    "i,9,,,   \n"
)


def test_bad_rows_keep_returns_cells_as_written(tmp_path: Path) -> None:
    manifest = read_manifest(write_csv(tmp_path / "m.csv", BAD_ROWS_CSV), bad_rows="keep")
    frame = manifest.frame
    assert len(frame) == 9
    assert frame["id"].tolist() == ["a", "a", None, "d", "e", "f", "g", "h", "i"]
    assert frame["label"].tolist() == ["1", "2", "3", None, "5", "6", "7", "8", "9"]
    assert frame["split"].tolist()[:5] == ["train", "train", "val", "test", "training"]
    assert frame["split"][5] in SPLITS
    assert frame["image"].tolist()[5:8] == ["/etc/passwd", "../outside.png", None]
    # Whitespace-only text is text, so validation can report it; an empty cell is no text.
    assert frame["text"].tolist()[7:] == [None, "   "]


def test_bad_rows_raise_names_the_first(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"duplicate id 'a' on line 2 and line 3"):
        read_manifest(write_csv(tmp_path / "m.csv", BAD_ROWS_CSV))


def test_non_utf8_cell_names_the_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,label,text\na,1,caf\xe9\nb,2,fine\n")
    with pytest.raises(DataError, match=r"line 2, column 'text': the cell is not valid UTF-8 text"):
        read_manifest(path)
    kept = read_manifest(path, bad_rows="keep").frame
    assert kept["text"][0] == "caf\udce9"
    assert kept["text"][1] == "fine"


def test_header_only_manifest_has_no_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"contains no rows"):
        read_manifest(write_csv(tmp_path / "m.csv", "id,label,image\n"))
