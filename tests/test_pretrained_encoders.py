"""Pretrained encoders: tiny random torchvision, timm, ViT, CLIP and wav2vec2 models saved by the tests and loaded back."""

from __future__ import annotations

import re

import onnx
import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as tvf
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

from mmkd.config import EncoderConfig, ImageConfig, load_config, save_config
from mmkd.errors import ConfigError
from mmkd.flows.distill import distill_flow
from mmkd.flows.export import export_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.models.pretrained import PretrainedImageEncoder

from conftest import write_config

IMAGE = ImageConfig()  # 28 x 28 grey, MNIST's mean and standard deviation


def images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(count))


def expected_pixels(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """The backbone input, computed with torchvision's own resize and normalise."""
    pixels = (x * IMAGE.std + IMAGE.mean).repeat(1, 3, 1, 1)
    pixels = tvf.resize(pixels, [size, size], antialias=False)
    return tvf.normalize(pixels, list(mean), list(std))


def test_torchvision_weights_file_loads(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pt")
    encoder = PretrainedImageEncoder(
        EncoderConfig(pretrained="torchvision:resnet18", weights=str(tmp_path / "resnet18.pt"), input_size=32), 8, IMAGE
    ).eval()
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = images()
    with torch.no_grad():
        features = reference(expected_pixels(x, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        expected = encoder.proj(features)
        got = encoder(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_torchvision_last_block_trains():
    encoder = PretrainedImageEncoder(EncoderConfig(pretrained="torchvision:resnet18", trainable_blocks=1), 8, IMAGE)
    trainable = {name.split(".")[1] for name, p in encoder.named_parameters() if p.requires_grad and name.startswith("backbone.")}
    assert trainable == {"layer4"}


def test_timm_weights_and_normalisation(tmp_path):
    import timm

    torch.manual_seed(1)
    reference = timm.create_model("resnet18", num_classes=0)
    torch.save(reference.state_dict(), tmp_path / "timm.pt")
    encoder = PretrainedImageEncoder(
        EncoderConfig(pretrained="timm:resnet18", weights=str(tmp_path / "timm.pt"), input_size=40), 8, IMAGE
    ).eval()
    config = reference.pretrained_cfg
    x = images(2)
    with torch.no_grad():
        expected = encoder.proj(reference.eval()(expected_pixels(x, 40, config["mean"], config["std"])))
        got = encoder(x)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(2)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64), add_pooling_layer=False)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder, model.eval()


def test_vit_takes_processor_size_and_normalisation(tiny_vit):
    folder, reference = tiny_vit
    encoder = PretrainedImageEncoder(EncoderConfig(pretrained=str(folder)), 8, IMAGE).eval()
    assert encoder.input_size == 32
    x = images(4)
    with torch.no_grad():
        hidden = reference(pixel_values=expected_pixels(x, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))).last_hidden_state
        expected = encoder.proj(hidden[:, 0])
        got = encoder(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_vit_mean_pooling_and_frozen_blocks(tiny_vit):
    folder, _ = tiny_vit
    encoder = PretrainedImageEncoder(EncoderConfig(pretrained=str(folder), pooling="mean", trainable_blocks=1), 8, IMAGE)
    trainable = {name for name, p in encoder.backbone.named_parameters() if p.requires_grad}
    assert trainable
    # The second (last) of the two blocks, named encoder.layer.1 or layers.1 by transformers releases.
    assert all(re.match(r"(encoder\.layer|layers)\.1\.", name) for name in trainable)


def test_clip_vision_tower(tmp_path):
    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 100},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                       "image_size": 24, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(tmp_path)
    encoder = PretrainedImageEncoder(EncoderConfig(pretrained=str(tmp_path)), 8, IMAGE).eval()
    assert type(encoder.backbone).__name__ == "CLIPVisionModel"
    assert encoder.input_size == 24
    assert encoder(images(2)).shape == (2, 8)


def test_missing_weights_file_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nothing\.pt is not a file"):
        PretrainedImageEncoder(EncoderConfig(pretrained="torchvision:resnet18", weights=str(tmp_path / "nothing.pt")), 8, IMAGE)


def test_default_weights_need_download_or_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        PretrainedImageEncoder(EncoderConfig(pretrained="torchvision:resnet18", weights="default"), 8, IMAGE)
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-") in message
    assert "downloads are off" in message
    assert "https://download.pytorch.org/models/resnet18-" in message


def test_unknown_torchvision_model():
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet19'"):
        PretrainedImageEncoder(EncoderConfig(pretrained="torchvision:resnet19"), 8, IMAGE)


def export_after_training(tmp_path, manifest, modality: str, **changes):
    """Run the stages up to export on one modality of `manifest`; return the config, run folder and export report."""
    config = load_config(write_config(tmp_path / "configs", manifest, data={"manifest": str(manifest), "modalities": [modality]},
                                      **changes))
    folder = tmp_path / "run"
    folder.mkdir()
    save_config(config, folder / "config.yaml")
    for stage in (teacher_flow, extract_flow, distill_flow, finetune_flow):
        stage.fn(str(folder))
    return config, folder, export_flow.fn(str(folder))


def test_torchvision_teacher_and_student_export(tmp_path, small_avdigits, prefect_server):
    config, folder, report = export_after_training(
        tmp_path, small_avdigits, "image",
        teacher={"image_encoder": {"pretrained": "torchvision:resnet18", "input_size": 32}, "embed_dim": 16,
                 "fusion": {"name": "concat"}},
        student={"image_encoder": {"pretrained": "torchvision:mobilenet_v3_small", "input_size": 32}},
    )
    for role in ("teacher", "student"):
        assert report[role]["max_abs_diff"] <= config.export.parity_max_abs_diff
        exported = onnx.load(str(folder / f"{role}.onnx"))
        assert [i.name for i in exported.graph.input] == ["image", "mask"]
        assert any(node.op_type == "Resize" for node in exported.graph.node)


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = tmp_path_factory.mktemp("wav2vec2")
    torch.manual_seed(3)
    model = Wav2Vec2Model(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    ))
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder


def test_speech_model_matches_feature_extractor(tiny_wav2vec2):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from mmkd.config import AudioConfig
    from mmkd.models.pretrained import PretrainedAudioEncoder

    encoder = PretrainedAudioEncoder(EncoderConfig(pretrained=str(tiny_wav2vec2)), 8, AudioConfig(sample_rate_hz=16000)).eval()
    waveform = torch.randn(2, 8000, generator=torch.Generator().manual_seed(4)) * 0.2
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(tiny_wav2vec2)
    values = extractor(list(waveform.numpy()), sampling_rate=16000, return_tensors="pt")["input_values"]
    reference = Wav2Vec2Model.from_pretrained(tiny_wav2vec2).eval()
    with torch.no_grad():
        expected = encoder.proj(reference(input_values=values).last_hidden_state.mean(dim=1))
        got = encoder(waveform)
    assert torch.allclose(got, expected, atol=1e-4)


def test_speech_model_resamples_to_its_rate(tiny_wav2vec2):
    from mmkd.config import AudioConfig
    from mmkd.models.pretrained import PretrainedAudioEncoder

    encoder = PretrainedAudioEncoder(EncoderConfig(pretrained=str(tiny_wav2vec2), trainable_blocks=0), 8,
                                     AudioConfig(sample_rate_hz=8000))
    adapted = encoder.adapt(torch.randn(3, 4000))
    assert adapted.shape == (3, 8000)
    assert torch.allclose(adapted.mean(dim=1), torch.zeros(3), atol=1e-5)
    assert not any(p.requires_grad for p in encoder.backbone.parameters())


def test_speech_teacher_pipeline_exports(tmp_path, small_avdigits, tiny_wav2vec2, prefect_server):
    config, folder, report = export_after_training(
        tmp_path, small_avdigits, "audio",
        teacher={"audio_encoder": {"pretrained": str(tiny_wav2vec2)}, "embed_dim": 16, "fusion": {"name": "concat"}},
    )
    assert report["teacher"]["max_abs_diff"] <= config.export.parity_max_abs_diff
    teacher = onnx.load(str(folder / "teacher.onnx"))
    assert [i.name for i in teacher.graph.input] == ["audio", "mask"]


def test_clip_text_tower(tmp_path):
    from mmkd.config import TextEncoderConfig
    from mmkd.models.text import TextEncoder

    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                       "image_size": 24, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(5)
    reference = CLIPModel(config)
    reference.save_pretrained(tmp_path)
    encoder = TextEncoder(TextEncoderConfig(pretrained=str(tmp_path), pooling="mean", trainable_blocks=1), 8,
                          vocab_size=0).eval()
    assert type(encoder.transformer).__name__ == "CLIPTextModel"
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(6))
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        hidden = reference.text_model(input_ids=ids, attention_mask=attention).last_hidden_state
        expected = encoder.proj((hidden * attention[..., None]).sum(1) / attention.sum(1, keepdim=True))
        got = encoder(ids, attention)
    assert torch.allclose(got, expected, atol=1e-5)
    trainable = {name for name, p in encoder.transformer.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".layers.1." in f".{name}" for name in trainable)


def test_vit_attention_pooling(tiny_vit):
    folder, reference = tiny_vit
    encoder = PretrainedImageEncoder(EncoderConfig(pretrained=str(folder), pooling="attention"), 8, IMAGE).eval()
    x = images(2)
    with torch.no_grad():
        hidden = reference(pixel_values=expected_pixels(x, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))).last_hidden_state
        weights = torch.softmax(encoder.attention.score(hidden).squeeze(-1), dim=1)
        expected = encoder.proj((weights[..., None] * hidden).sum(1))
        got = encoder(x)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    folder = tmp_path_factory.mktemp("ast")
    torch.manual_seed(7)
    ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_mel_bins=32, max_length=64)).save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(folder)
    return folder


def test_ast_filter_bank_matches_extractor(tiny_ast):
    from transformers import ASTFeatureExtractor, ASTModel

    from mmkd.config import AudioConfig
    from mmkd.models.pretrained import PretrainedAudioEncoder

    encoder = PretrainedAudioEncoder(EncoderConfig(pretrained=str(tiny_ast)), 8, AudioConfig(sample_rate_hz=16000)).eval()
    # 0.5 s gives 48 frames, padded to 64; 0.8 s gives 78, cut to 64.
    for samples in (8000, 12800):
        waveform = torch.randn(2, samples, generator=torch.Generator().manual_seed(samples)) * 0.1
        extractor = ASTFeatureExtractor.from_pretrained(tiny_ast)
        expected = extractor(list(waveform.numpy()), sampling_rate=16000, return_tensors="pt")["input_values"]
        got = encoder.adapt(waveform)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4)
    reference = ASTModel.from_pretrained(tiny_ast).eval()
    with torch.no_grad():
        hidden = reference(input_values=expected).last_hidden_state
        assert torch.allclose(encoder(waveform), encoder.proj(hidden.mean(dim=1)), atol=1e-3)
