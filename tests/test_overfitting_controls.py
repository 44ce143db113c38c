"""Controls against overfitting: augmentation, label smoothing, adversarial copies, frozen layers and LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmkd.augment import Adversary, Augmenter
from mmkd.config import (
    AdversarialConfig,
    AudioConfig,
    AugmentConfig,
    ImageConfig,
    LoraSettings,
    ModelConfig,
    StudentConfig,
    TrainConfig,
)
from mmkd.data.loading import TensorDataset
from mmkd.errors import ConfigError
from mmkd.models.adapters import merged
from mmkd.models.encoders import AudioEncoder
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.train_state import TrainingState
from mmkd.training import Runtime, cross_entropy_loss, fit, supervised_loss

IMAGE = ImageConfig()
AUDIO = AudioConfig()


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def waveforms(count: int, samples: int = 8000, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(count, samples, generator=torch.Generator().manual_seed(seed))


def augmenter(modalities: list[str], **sections) -> Augmenter:
    return Augmenter(AugmentConfig(**sections), modalities, IMAGE, AUDIO.hop_length)


def test_random_crop_shifts():
    torch.manual_seed(0)
    batch = images(16)
    (changed,) = augmenter(["image"], image={"crop_padding": 2})((batch,))
    black = -IMAGE.mean / IMAGE.std
    shifts = set()
    for original, row in zip(batch, changed, strict=True):
        padded = nn.functional.pad(original, (2, 2, 2, 2), value=black)
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[:, dy:dy + 28, dx:dx + 28], row)]
        assert found, "an augmented image is not a shifted copy of its original"
        shifts.add(found[0])
    assert len(shifts) > 1  # drawn per row, not once per batch


def test_affine_and_no_settings():
    torch.manual_seed(0)
    batch = images(8)
    (rotated,) = augmenter(["image"], image={"degrees": 30, "scale": (0.9, 1.1)})((batch,))
    assert all(not torch.equal(a, b) for a, b in zip(batch, rotated, strict=True))
    assert not augmenter(["image", "audio", "text"]).active


def test_gain_range():
    torch.manual_seed(0)
    batch = waveforms(32)
    (_, louder, _) = augmenter(["image", "audio"], audio={"gain_db": 6})((images(32), batch, torch.ones(32, 2)))
    factors = louder.abs().sum(1) / batch.abs().sum(1)
    assert torch.allclose(louder, batch * factors[:, None], atol=1e-6)
    assert factors.min() >= 10 ** (-6 / 20) - 1e-5
    assert factors.max() <= 10 ** (6 / 20) + 1e-5
    assert factors.max() - factors.min() > 0.3


def test_noise_snr():
    torch.manual_seed(0)
    batch = waveforms(8, samples=64000)
    (noisy,) = augmenter(["audio"], audio={"noise_snr_db": 20})((batch,))
    measured = 10 * torch.log10(batch.pow(2).mean(1) / (noisy - batch).pow(2).mean(1))
    assert torch.allclose(measured, torch.full_like(measured, 20.0), atol=0.3)


def test_spectrogram_masks():
    torch.manual_seed(0)
    encoder = AudioEncoder(AUDIO, StudentConfig().audio_encoder, 8)
    batch = waveforms(12)
    clean = encoder.front_end(batch)
    aug = augmenter(["audio"], audio={"freq_masks": 1, "freq_mask_bins": 5, "time_masks": 1, "time_mask_frames": 7})
    model = nn.Module()
    model.encoders = nn.ModuleDict({"audio": encoder})
    aug.attach(model)
    masked = encoder.front_end.train()(batch)
    assert torch.equal(encoder.front_end.eval()(batch), clean)
    aug.detach()
    assert torch.equal(encoder.front_end.train()(batch), clean)
    for original, row in zip(clean, masked, strict=True):
        changed = original[0] != row[0]  # (mel bands, frames)
        bands = changed.all(dim=1).nonzero().flatten()
        frames = changed.all(dim=0).nonzero().flatten()
        # Every changed value lies in the masked band or the masked frames, and takes the spectrogram's mean.
        in_mask = torch.zeros_like(changed)
        in_mask[bands] = True
        in_mask[:, frames] = True
        assert torch.equal(changed, changed & in_mask)
        assert len(bands) <= 5
        assert len(frames) <= 7
        if len(bands):
            assert bands.max() - bands.min() + 1 == len(bands)
            assert torch.allclose(row[0][bands[0]], original.mean().expand(row.shape[2]))


def test_waveform_time_masks():
    torch.manual_seed(0)
    batch = waveforms(6)
    (masked,) = augmenter(["audio"], audio={"time_masks": 2, "time_mask_frames": 4})((batch,))
    zeroed = (masked == 0) & (batch != 0)
    assert torch.equal(masked[~zeroed], batch[~zeroed])
    assert 0 < int(zeroed.sum(1).max()) <= 2 * 4 * AUDIO.hop_length


def test_token_dropout():
    torch.manual_seed(0)
    ids, attention = torch.randint(5, 100, (64, 40)), torch.ones(64, 40, dtype=torch.long)
    (same_ids, dropped) = augmenter(["text"], text={"token_dropout": 0.25})((ids, attention))
    assert torch.equal(same_ids, ids)
    assert bool(dropped[:, 0].all())
    assert float(1 - dropped[:, 1:].float().mean()) == pytest.approx(0.25, abs=0.02)


def test_label_smoothing_targets():
    logits, labels = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 4
    loss, _ = supervised_loss(0.2)((logits, logits), ((), labels, torch.arange(10)))
    targets = torch.full((10, 4), 0.2 / 4)
    targets[torch.arange(10), labels] += 0.8
    expected = -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert supervised_loss(0.0) is cross_entropy_loss


class LinearImageModel(nn.Module):
    """A linear image classifier with one batch-norm buffer, for checking perturbations by hand."""

    modalities = ["image"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm2d(1)
        self.linear = nn.Linear(28 * 28, 3)

    def forward(self, image, mask):
        embedding = self.linear(self.norm(image).flatten(1))
        return embedding, embedding


def plain_step(model):
    return lambda inputs, labels, rows: cross_entropy_loss(model(*inputs), (inputs, labels, rows))


def test_fgsm_copy():
    model = LinearImageModel().train()
    batch, mask, labels = images(6), torch.ones(6, 1, dtype=torch.bool), torch.tensor([0, 1, 2, 0, 1, 2])
    norm_state = {k: v.clone() for k, v in model.norm.state_dict().items()}
    adversary = Adversary(AdversarialConfig(method="fgsm", image_epsilon=0.05), model)
    (extended, _), extended_labels, rows = adversary.extend(plain_step(model), (batch, mask), labels, torch.arange(6))

    # The gradient of the batch's mean loss with respect to its pixels, computed here.
    model.load_state_dict({**model.state_dict(), **{f"norm.{k}": v for k, v in norm_state.items()}})
    pixels = batch.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(pixels, mask)[0], labels).backward()
    assert torch.equal(extended[:6], batch)
    assert torch.allclose(extended[6:], batch + 0.05 * pixels.grad.sign(), atol=1e-7)
    assert torch.equal(extended_labels, torch.cat([labels, labels]))
    assert torch.equal(rows, torch.arange(6).repeat(2))


def test_pgd_copy():
    model = LinearImageModel().train()
    batch, mask, labels = images(32), torch.ones(32, 1, dtype=torch.bool), torch.arange(32) % 3
    before = {k: v.clone() for k, v in model.norm.state_dict().items()}
    torch.manual_seed(1)
    adversary = Adversary(AdversarialConfig(method="pgd", image_epsilon=0.1, steps=5, step_fraction=0.3), model)
    (extended, _), _, _ = adversary.extend(plain_step(model), (batch, mask), labels, torch.arange(32))
    assert all(torch.equal(before[k], v) for k, v in model.norm.state_dict().items())
    change = extended[32:] - batch
    assert float(change.abs().max()) <= 0.1 + 1e-6
    assert float(change.abs().max()) > 0.09
    with torch.no_grad():
        clean = nn.functional.cross_entropy(model.eval()(batch, mask)[0], labels)
        attacked = nn.functional.cross_entropy(model(extended[32:], mask)[0], labels)
    assert float(attacked) > float(clean)


def text_model(**config) -> MultimodalClassifier:
    torch.manual_seed(0)
    return MultimodalClassifier(
        StudentConfig(text_encoder={"layers": 1, "hidden_size": 16, "heads": 2}, embed_dim=8, **config),
        modalities=["text"], num_classes=3, image=IMAGE, audio=AUDIO, vocab_size=50,
    )


def test_text_embedding_perturbation():
    model = text_model(dropout=0.0).train()
    ids = torch.randint(3, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    attention, mask, labels = torch.ones(8, 12, dtype=torch.long), torch.ones(8, 1, dtype=torch.bool), torch.arange(8) % 3
    torch.manual_seed(2)
    adversary = Adversary(AdversarialConfig(method="pgd", text_epsilon=0.5, steps=3), model)
    extended, extended_labels, _ = adversary.extend(plain_step(model), (ids, attention, mask), labels, torch.arange(8))
    assert torch.equal(extended[0], torch.cat([ids, ids]))
    assert len(extended_labels) == 16
    norms = adversary.text_delta.norm(dim=-1)
    assert float(norms.max()) <= 0.5 + 1e-5
    assert float(norms.min()) > 0.4
    model.eval()
    with torch.no_grad():
        clean = float(nn.functional.cross_entropy(model(ids, attention, mask)[0], labels))
        hook = adversary.hook_training_pass()
        logits = model(*extended)[0]
        hook.remove()
        again = float(nn.functional.cross_entropy(model(ids, attention, mask)[0], labels))
    assert float(nn.functional.cross_entropy(logits[:8], labels)) == pytest.approx(clean, rel=1e-5)
    assert float(nn.functional.cross_entropy(logits[8:], labels)) > clean
    assert again == pytest.approx(clean, rel=1e-6)  # the hook is gone


def av_rows(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        inputs={"image": torch.randn(count, 1, 28, 28, generator=generator),
                "audio": 0.1 * torch.randn(count, 8000, generator=generator)},
        mask=torch.ones(count, 2, dtype=torch.bool), labels=torch.arange(count) % 3,
        ids=[str(i) for i in range(count)], splits=["train"] * count, keys=[str(i) for i in range(count)],
        classes=["a", "b", "c"], modalities=["image", "audio"],
    )


def av_model() -> MultimodalClassifier:
    torch.manual_seed(0)
    return MultimodalClassifier(
        ModelConfig(image_encoder={"width": 4, "blocks": [1]}, audio_encoder={"width": 4, "blocks": [1]}, embed_dim=8),
        modalities=["image", "audio"], num_classes=3, image=IMAGE, audio=AUDIO,
    )


def test_augmented_adversarial_resume(tmp_path):
    config = TrainConfig(epochs=2, batch_size=8, lr=0.01, patience=2, checkpoint_every_steps=1,
                         adversarial=AdversarialConfig(method="pgd", steps=2), label_smoothing=0.1)
    sections = {"image": {"degrees": 10, "crop_padding": 2}, "audio": {"freq_masks": 1, "time_masks": 1, "gain_db": 3}}

    def train(state, loss_fn):
        model = av_model()
        fit(model, av_rows(32, 1), av_rows(8, 2), config, loss_fn, stage="test", seed=0, runtime=Runtime(),
            state=state, augmenter=augmenter(["image", "audio"], **sections))
        return model

    reference = train(None, supervised_loss(0.1))
    calls = {"count": 0}

    def crashing(outputs, batch):
        calls["count"] += 1
        if calls["count"] == 14:  # inside step 5's ascent passes
            raise KeyboardInterrupt
        return supervised_loss(0.1)(outputs, batch)

    state = TrainingState(tmp_path, stage="test", config_hash="a")
    with pytest.raises(KeyboardInterrupt):
        train(state, crashing)
    resumed = train(state, supervised_loss(0.1))
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True))
    assert not any(module._forward_hooks for module in resumed.modules())


def test_freeze_by_prefix():
    torch.manual_seed(0)
    model = MultimodalClassifier(
        ModelConfig(image_encoder={"width": 4, "blocks": [1]}, embed_dim=8, freeze=["encoders.image.stem"]),
        modalities=["image"], num_classes=3, image=IMAGE, audio=AUDIO,
    )
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith("encoders.image.stem.") for name in frozen)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = TensorDataset(inputs={"image": images(16)}, mask=torch.ones(16, 1, dtype=torch.bool),
                         labels=torch.arange(16) % 3, ids=[str(i) for i in range(16)], splits=["train"] * 16,
                         keys=[str(i) for i in range(16)], classes=["a", "b", "c"], modalities=["image"])
    fit(model, rows, rows, TrainConfig(epochs=1, batch_size=8, patience=1), cross_entropy_loss, stage="test", seed=0,
        runtime=Runtime())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name in frozen), name
    with pytest.raises(ConfigError, match=r"'encoders.imag' names no parameter.*encoders.image"):
        MultimodalClassifier(ModelConfig(freeze=["encoders.imag"]), modalities=["image"], num_classes=3,
                             image=IMAGE, audio=AUDIO)


def test_lora_adapters_and_merge():
    model = text_model(lora=LoraSettings(rank=4, alpha=8, target_modules=["query", "value"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    transformer = {name for name in trainable if ".transformer." in name}
    assert transformer and all("lora_" in name for name in transformer)
    assert any(name.startswith("head.") for name in trainable)
    # Adapters start at zero: a training step is needed before they change anything.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(3, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.ones(4, 9, dtype=torch.long), torch.ones(4, 1, dtype=torch.bool))
    model.eval()
    folded = merged(model)
    assert not any("lora_" in name for name, _ in folded.named_parameters())
    assert any("lora_" in name for name, _ in model.named_parameters())  # the original keeps its adapters
    with torch.no_grad():
        assert torch.allclose(folded(*inputs)[0], model(*inputs)[0], atol=1e-5)
        without = text_model()
        without.load_state_dict({k: v for k, v in folded.state_dict().items()}, strict=True)
        assert torch.allclose(without.eval()(*inputs)[0], model(*inputs)[0], atol=1e-5)
        assert not math.isclose(float(model(*inputs)[0].sum()), float(text_model().eval()(*inputs)[0].sum()))
