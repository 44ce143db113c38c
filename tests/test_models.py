import numpy as np
import torch

from mmkd.config import config_from_dict
from mmkd.checkpoints import build_model
from mmkd.models.audio import LogMelSpectrogram, hz_to_mel, mel_filterbank
from mmkd.models.multimodal import count_parameters


def test_log_mel_matches_a_numpy_fft_of_hann_windowed_frames():
    rng = np.random.default_rng(0)
    waveform = rng.standard_normal(2000).astype(np.float32)
    n_fft, hop, n_mels, rate = 256, 128, 20, 8000
    front_end = LogMelSpectrogram(sample_rate_hz=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    ours = front_end(torch.from_numpy(waveform)[None])[0, 0].numpy()

    frames = 1 + (waveform.size - n_fft) // hop
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    spectra = np.stack([np.fft.rfft(waveform[i * hop : i * hop + n_fft] * window) for i in range(frames)], axis=1)
    expected = np.log(mel_filterbank(rate, n_fft, n_mels) @ np.abs(spectra) ** 2 + 1e-6)
    assert ours.shape == (n_mels, frames)
    assert np.allclose(ours, expected, atol=1e-3)


def test_mel_scale_and_filters_have_their_textbook_values():
    assert hz_to_mel(np.array(1000.0)) == np.float64(2595.0 * np.log10(1 + 1000 / 700))
    assert abs(float(hz_to_mel(np.array(1000.0))) - 1000.0) < 0.1
    filters = mel_filterbank(8000, 256, 40)
    assert filters.shape == (40, 129)
    assert filters.min() >= 0.0
    assert filters.max() <= 1.0
    assert (filters.sum(axis=1) > 0).all()


def test_packaged_student_is_over_ten_times_smaller_than_the_teacher(tmp_path):
    from importlib import resources

    import yaml

    raw = yaml.safe_load(resources.files("mmkd").joinpath("configs/avdigits.yaml").read_text())
    config = config_from_dict(raw, base_dir=tmp_path)
    classes = [str(d) for d in range(10)]
    teacher = count_parameters(build_model(config, "teacher", classes))
    student = count_parameters(build_model(config, "student", classes))
    assert student * 10 <= teacher


def test_classifier_accepts_any_batch_size_and_audio_length(tmp_path):
    config = config_from_dict({"data": {"manifest": "m.csv"}}, base_dir=tmp_path)
    model = build_model(config, "student", ["a", "b", "c"]).eval()
    for batch, samples in ((1, 10800), (3, 4000)):
        logits, embedding = model(torch.zeros(batch, 1, 28, 28), torch.zeros(batch, samples), torch.ones(batch, 2, dtype=torch.bool))
        assert logits.shape == (batch, 3)
        assert embedding.shape == (batch, model.embedding_dim)
