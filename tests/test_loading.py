import shutil
import wave

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmkd.config import DataConfig
from mmkd.data.loading import decode_audio, decode_image, decode_to_cache, load_dataset
from mmkd.errors import DataError

from conftest import FSDD_DIR, require_shared_data


@pytest.fixture
def data_folder(tmp_path):
    """Three rows of real recordings and small images: a, b (no image) and c."""
    require_shared_data()
    recordings = FSDD_DIR / "recordings"
    for name in ("0_george_0.wav", "1_george_0.wav", "2_george_0.wav"):
        shutil.copy(recordings / name, tmp_path / name)
    for index, digit in enumerate("012"):
        pixels = np.full((28, 28), 40 * index, dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(tmp_path / f"{digit}.png")
    return tmp_path


def write_manifest(folder, rows):
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def rows_for(folder):
    return [
        {"id": "a", "label": "0", "split": "train", "image": "0.png", "audio": "0_george_0.wav"},
        {"id": "b", "label": "1", "split": "val", "image": "", "audio": "1_george_0.wav"},
        {"id": "c", "label": "2", "split": "test", "image": "2.png", "audio": "2_george_0.wav"},
    ]


def test_rows_decode_to_tensors_with_masks_labels_and_splits(data_folder):
    manifest = write_manifest(data_folder, rows_for(data_folder))
    dataset = load_dataset(DataConfig(manifest=manifest))
    assert dataset.ids == ["a", "b", "c"]
    assert dataset.splits == ["train", "val", "test"]
    assert dataset.labels.tolist() == [0, 1, 2]
    assert dataset.mask.tolist() == [[True, True], [False, True], [True, True]]
    assert dataset.inputs["image"].shape == (3, 1, 28, 28)
    assert dataset.inputs["audio"].shape == (3, 10800)
    # A missing image is all zeros; a present one is normalised: (40/255 - mean) / std for row c's grey 80.
    assert torch.count_nonzero(dataset.inputs["image"][1]) == 0
    assert dataset.inputs["image"][2, 0, 0, 0].item() == pytest.approx((80 / 255 - 0.1307) / 0.3081, abs=1e-6)


def test_audio_is_scaled_from_int16_and_zero_padded(data_folder):
    path = data_folder / "0_george_0.wav"
    with wave.open(str(path)) as wav:
        raw = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    samples = decode_audio(path, DataConfig(manifest=path).audio)
    assert samples.shape == (10800,)
    assert np.array_equal(samples[: raw.size], raw.astype(np.float32) / 32768.0)
    assert not samples[raw.size :].any()


def test_long_audio_is_centre_cropped(tmp_path):
    path = tmp_path / "long.wav"
    values = np.arange(12000, dtype=np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(values.tobytes())
    samples = decode_audio(path, DataConfig(manifest=path).audio)
    assert samples[0] * 32768 == pytest.approx(600)  # (12000 - 10800) / 2
    assert samples[-1] * 32768 == pytest.approx(11399)


def test_missing_file_stops_with_the_row_id_path_and_reason(data_folder):
    rows = rows_for(data_folder)
    rows[1]["audio"] = "gone.wav"
    manifest = write_manifest(data_folder, rows)
    with pytest.raises(DataError, match=r"row 2 \(id 'b'\), column 'audio': .*gone\.wav cannot be used because the file does not exist"):
        load_dataset(DataConfig(manifest=manifest))


def test_file_that_does_not_decode_stops_with_the_reason(data_folder):
    (data_folder / "broken.wav").write_bytes(b"this is not a wav file")
    rows = rows_for(data_folder)
    rows[2]["audio"] = "broken.wav"
    with pytest.raises(DataError, match=r"row 3 \(id 'c'\), column 'audio': .*broken\.wav cannot be used because it does not decode"):
        load_dataset(DataConfig(manifest=write_manifest(data_folder, rows)))


def test_truncated_image_stops_with_the_reason(data_folder):
    data = (data_folder / "0.png").read_bytes()
    (data_folder / "0.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"row 1 \(id 'a'\), column 'image': .*0\.png cannot be used because it does not decode"):
        load_dataset(DataConfig(manifest=write_manifest(data_folder, rows_for(data_folder))))


def test_truncated_recording_stops_with_the_frame_counts(data_folder):
    data = (data_folder / "1_george_0.wav").read_bytes()
    (data_folder / "1_george_0.wav").write_bytes(data[:100])
    with pytest.raises(DataError, match=r"row 2 \(id 'b'\), column 'audio': .*because it does not decode: truncated WAV: the data chunk declares \d+ bytes but the file contains only 56"):
        load_dataset(DataConfig(manifest=write_manifest(data_folder, rows_for(data_folder))))


def test_wrong_sample_rate_names_both_rates(data_folder):
    with wave.open(str(data_folder / "fast.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(np.zeros(4000, dtype=np.int16).tobytes())
    rows = rows_for(data_folder)
    rows[0]["audio"] = "fast.wav"
    with pytest.raises(DataError, match=r"the recording is 16000 Hz, expected 8000 Hz \(set data\.audio\.resample: true"):
        load_dataset(DataConfig(manifest=write_manifest(data_folder, rows)))


def test_labels_outside_declared_classes_are_named(data_folder):
    manifest = write_manifest(data_folder, rows_for(data_folder))
    with pytest.raises(DataError, match=r"labels \['2'\] are not in data\.classes \['0', '1'\]"):
        load_dataset(DataConfig(manifest=manifest, classes=["0", "1"]))


def test_decoded_tensors_are_cached_and_a_changed_file_invalidates_the_cache(data_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    manifest = write_manifest(data_folder, rows_for(data_folder))
    first = load_dataset(DataConfig(manifest=manifest), cache_dir=cache)
    assert len(list(cache.glob("tensors-*.pt"))) == 1
    second = load_dataset(DataConfig(manifest=manifest), cache_dir=cache)
    assert torch.equal(first.inputs["audio"], second.inputs["audio"])
    assert first.keys == second.keys

    Image.fromarray(np.full((28, 28), 255, dtype=np.uint8), mode="L").save(data_folder / "2.png")
    third = load_dataset(DataConfig(manifest=manifest), cache_dir=cache)
    assert len(list(cache.glob("tensors-*.pt"))) == 2
    assert third.keys[:2] == first.keys[:2]
    assert third.keys[2] != first.keys[2]


def test_rows_with_identical_content_share_a_feature_key(data_folder):
    rows = rows_for(data_folder)
    rows[1] = {**rows[0], "id": "a-copy", "split": "val"}
    dataset = load_dataset(DataConfig(manifest=write_manifest(data_folder, rows)))
    assert dataset.keys[0] == dataset.keys[1]
    assert dataset.keys[0] != dataset.keys[2]


def normalised(grey: float) -> float:
    """The loader's value for a grey level in [0, 1], with the default mean and std."""
    return (grey - 0.1307) / 0.3081


@pytest.mark.parametrize(
    ("make", "grey"),
    [
        # 16-bit grey keeps its precision: 30000 / 65535, where an 8-bit clip would give 1.0.
        (lambda: Image.fromarray(np.full((28, 28), 30000, dtype=np.uint16)), 30000 / 65535),
        # A palette image is read through its palette: index 1 is grey 100.
        (lambda: palette_image(), 100 / 255),
        # Alpha is dropped: a fully transparent grey 50 reads as grey 50.
        (lambda: Image.new("RGBA", (28, 28), (50, 50, 50, 0)), 50 / 255),
        # CMYK with no ink is white.
        (lambda: Image.new("CMYK", (28, 28), (0, 0, 0, 0)), 1.0),
    ],
    ids=["16-bit", "palette", "rgba", "cmyk"],
)
def test_uncommon_image_modes_decode_to_the_expected_grey(tmp_path, make, grey):
    path = tmp_path / ("x.tif" if make().mode == "CMYK" else "x.png")
    make().save(path)
    array = decode_image(path, DataConfig(manifest=path).image)
    assert array.shape == (1, 28, 28)
    assert array[0, 3, 5] == pytest.approx(normalised(grey), abs=1e-5)


def palette_image():
    image = Image.new("P", (28, 28), 1)
    image.putpalette([0, 0, 0, 100, 100, 100] + [0, 0, 0] * 254)
    return image


def test_decode_image_rejects_over_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (40, 30)).save(path)
    config = DataConfig(manifest=path, image={"max_pixels": 1000}).image
    with pytest.raises(ValueError, match=r"declares 40x30 = 1200 pixels, above data\.image\.max_pixels = 1000"):
        decode_image(path, config)


def test_decoding_workers_give_the_same_tensors(small_avdigits):
    config = DataConfig(manifest=small_avdigits)
    in_process = load_dataset(config)
    in_workers = load_dataset(config.model_copy(update={"decode_workers": 2}))
    assert in_workers.keys == in_process.keys
    assert torch.equal(in_workers.mask, in_process.mask)
    for modality in ("image", "audio"):
        assert torch.equal(in_workers.inputs[modality], in_process.inputs[modality]), modality


def test_decoding_workers_share_the_tensor_cache(small_avdigits, tmp_path):
    config = DataConfig(manifest=small_avdigits)
    first = decode_to_cache(config, tmp_path)
    assert decode_to_cache(config.model_copy(update={"decode_workers": 2}), tmp_path) == first


def test_file_broken_in_a_worker_names_its_row(data_folder):
    (data_folder / "broken.wav").write_bytes(b"this is not a wav file")
    rows = rows_for(data_folder)
    rows[2]["audio"] = "broken.wav"
    config = DataConfig(manifest=write_manifest(data_folder, rows), decode_workers=2)
    with pytest.raises(DataError, match=r"row 3 \(id 'c'\), column 'audio': .*broken\.wav cannot be used because it does not decode"):
        load_dataset(config)
