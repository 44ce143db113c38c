"""Pretrained image backbones (torchvision, timm, transformers) and speech models (transformers) as encoders.

The dataset decodes every image once, at the config's size and normalisation. The encoder
adapts that tensor to the backbone inside the model: it undoes the dataset's normalisation,
repeats a grey channel to three, resizes to the backbone's input size and normalises with
the backbone's own mean and standard deviation. Those come from a transformers model's
image processor, from timm's pretrained config, or are ImageNet's for torchvision. The
exported ONNX model therefore takes the same image input as any other mmkd model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mmkd.config import AudioConfig, EncoderConfig, ImageConfig
from mmkd.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.")


def _drop_classifier(model: nn.Module) -> int:
    """Replace the last linear layer (the ImageNet classifier) with an identity; return its input width."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to remove")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    width = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return width


def _load_weights(model: nn.Module, weights: str, source: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"image_encoder.weights: {path} is not a file. Save the {source} model's state_dict there "
                          "(torch.save(model.state_dict(), path)), or leave weights out for random initialisation.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only the classifier may differ: mmkd replaces it with the fusion and head.
    missing = [k for k in missing if not k.startswith(CLASSIFIER_PREFIXES)]
    unexpected = [k for k in unexpected if not k.startswith(CLASSIFIER_PREFIXES)]
    if missing or unexpected:
        raise ConfigError(f"image_encoder.weights: {path} does not fit {source}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


def _torchvision(name: str, weights: str | None, allow_downloads: bool) -> nn.Module:
    import torchvision

    try:
        builder_weights = None
        if weights == "default":
            builder_weights = torchvision.models.get_model_weights(name).DEFAULT
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(builder_weights.url).name
            if not allow_downloads and not cached.exists():
                raise ConfigError(
                    f"image_encoder.weights: default weights of torchvision:{name} are not in {cached}, and "
                    f"downloads are off. Download {builder_weights.url} there, point weights at a file, or set "
                    "allow_downloads: true."
                )
        model = torchvision.models.get_model(name, weights=builder_weights)
    except ValueError as exc:
        raise ConfigError(f"image_encoder.pretrained: torchvision has no model {name!r} ({exc})") from None
    if weights not in (None, "default"):
        _load_weights(model, weights, f"torchvision:{name}")
    return model


def _timm(name: str, weights: str | None, allow_downloads: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError("image_encoder.pretrained names a timm model, but timm is not installed: "
                          "pip install 'mmkd[timm]'") from None
    if name not in timm.list_models():
        raise ConfigError(f"image_encoder.pretrained: timm has no model {name!r}")
    try:
        model = timm.create_model(name, pretrained=weights == "default", num_classes=0)
    except Exception as exc:  # noqa: BLE001 - timm raises several kinds when its weights cannot be fetched
        raise ConfigError(f"image_encoder.weights: default weights of timm:{name} could not be loaded"
                          f"{'' if allow_downloads else ' with downloads off'}: {exc}") from None
    if weights not in (None, "default"):
        _load_weights(model, weights, f"timm:{name}")
    return model


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the backbone's blocks in order, for freezing all but the last few."""
    from mmkd.models.text import transformer_blocks

    try:
        return list(transformer_blocks(model))
    except ConfigError:
        pass
    for path in ("features", "encoder.layers", "stages", "blocks"):
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if len(list(found.children())) >= 2:
            return list(found.children())
    return [child for child in model.children() if any(True for _ in child.parameters())]


class PretrainedImageEncoder(nn.Module):
    """A pretrained image backbone, its input adaptation, and a linear map to `embed_dim`."""

    def __init__(self, config: EncoderConfig, embed_dim: int, image: ImageConfig, *, allow_downloads: bool = False) -> None:
        super().__init__()
        name = config.pretrained or ""
        self.kind = "transformers"
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
        if name.startswith("torchvision:"):
            self.kind = "torchvision"
            self.backbone = _torchvision(name.split(":", 1)[1], config.weights, allow_downloads)
            width = _drop_classifier(self.backbone)
        elif name.startswith("timm:"):
            self.kind = "timm"
            self.backbone = _timm(name.split(":", 1)[1], config.weights, allow_downloads)
            width = self.backbone.num_features
            cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
            mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
            size = int(cfg.get("input_size", (3, size, size))[-1])
        else:
            self.backbone, (mean, std, size) = _transformers_vision(name, allow_downloads)
            width = self.backbone.config.hidden_size if hasattr(self.backbone.config, "hidden_size") else \
                self.backbone.config.hidden_sizes[-1]
        self.pooling = config.pooling
        self.attention = None
        if config.pooling == "attention" and self.kind == "transformers":
            from mmkd.models.text import AttentionPooling

            self.attention = AttentionPooling(width)
        self.input_size = config.input_size or size
        self.channels = image.channels
        self.register_buffer("data_mean", torch.tensor(image.mean))
        self.register_buffer("data_std", torch.tensor(image.std))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.proj = nn.Linear(width, embed_dim)
        if config.trainable_blocks is not None:
            for parameter in self.backbone.parameters():
                parameter.requires_grad_(False)
            blocks = backbone_blocks(self.backbone)
            for block in blocks[len(blocks) - config.trainable_blocks:] if config.trainable_blocks else []:
                for parameter in block.parameters():
                    parameter.requires_grad_(True)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Map dataset-normalised images to the backbone's input: three channels, its size and normalisation."""
        pixels = x * self.data_std + self.data_mean
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.shape[-1] != self.input_size or pixels.shape[-2] != self.input_size:
            pixels = nn.functional.interpolate(pixels, size=(self.input_size, self.input_size), mode="bilinear",
                                               align_corners=False)
        return (pixels - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = self.adapt(x)
        if self.kind != "transformers":
            return self.proj(self.backbone(pixels).flatten(1))
        outputs = self.backbone(pixel_values=pixels)
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # convolutional transformers models: (batch, channels, height, width)
            return self.proj(hidden.mean(dim=(2, 3)))
        if self.attention is not None:
            tokens = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            return self.proj(self.attention(hidden, tokens))
        return self.proj(hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1))


def _transformers_vision(name: str, allow_downloads: bool) -> tuple[nn.Module, tuple]:
    """Load a transformers vision model (the vision tower of a CLIP model) and its processor's mean, std and size."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

    from mmkd.models.text import _not_found

    try:
        settings = AutoConfig.from_pretrained(name, local_files_only=not allow_downloads)
        if settings.model_type == "clip":
            model = CLIPVisionModel.from_pretrained(name, local_files_only=not allow_downloads)
        else:
            model = AutoModel.from_pretrained(name, local_files_only=not allow_downloads)
        processor = AutoImageProcessor.from_pretrained(name, local_files_only=not allow_downloads)
    except OSError as exc:
        raise _not_found("pretrained image model", name, exc) from None
    size = processor.size
    if isinstance(size, int):
        side = size
    else:
        # A dict in older transformers releases, an object with the same keys in newer ones.
        fields = dict(size) if isinstance(size, dict) else {k: getattr(size, k, None) for k in ("height", "shortest_edge")}
        side = fields.get("height") or fields.get("shortest_edge")
    mean = tuple(processor.image_mean)
    std = tuple(processor.image_std)
    return model, (mean, std, int(side))


class KaldiFilterBank(nn.Module):
    """The log mel filter bank of the Audio Spectrogram Transformer's feature extractor, in torch.

    Frames of 400 samples every 160 have their mean removed, are pre-emphasised (0.97),
    windowed with the extractor's window and transformed (512-point DFT, as two matrix
    products so that any ONNX opset can run it). The power spectrum goes through the
    extractor's own mel filters, is floored and logged, cut or zero-padded to its
    `max_length` frames, and normalised with its mean and twice its standard deviation.
    """

    FRAME, HOP, FFT, PREEMPHASIS, FLOOR = 400, 160, 512, 0.97, 1.192092955078125e-07

    def __init__(self, extractor) -> None:
        super().__init__()
        import numpy as np

        bins = self.FFT // 2 + 1
        phase = 2.0 * np.pi * np.arange(bins)[None, :] * np.arange(self.FRAME)[:, None] / self.FFT
        window = np.asarray(extractor.window, dtype=np.float64)[:, None]
        self.register_buffer("cos", torch.from_numpy((np.cos(phase) * window).astype(np.float32)))
        self.register_buffer("sin", torch.from_numpy((np.sin(phase) * window).astype(np.float32)))
        self.register_buffer("mel", torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32)))
        self.max_length = int(extractor.max_length)
        self.mean, self.std = float(extractor.mean), float(extractor.std)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        frames = waveform.unfold(1, self.FRAME, self.HOP)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        frames = torch.cat([frames[..., :1] * (1 - self.PREEMPHASIS),
                            frames[..., 1:] - self.PREEMPHASIS * frames[..., :-1]], dim=-1)
        power = (frames @ self.cos) ** 2 + (frames @ self.sin) ** 2
        fbank = torch.log(torch.clamp(power @ self.mel, min=self.FLOOR))
        missing = self.max_length - fbank.shape[1]
        fbank = nn.functional.pad(fbank, (0, 0, 0, missing)) if missing > 0 else fbank[:, : self.max_length]
        return (fbank - self.mean) / (self.std * 2)


class PretrainedAudioEncoder(nn.Module):
    """A transformers audio model over the recording: speech models (wav2vec2, HuBERT, ...) or AST.

    The waveform is resampled inside the model to the feature extractor's rate by linear
    interpolation. A speech model then gets it normalised per recording to zero mean and
    unit variance when its extractor does so. The Audio Spectrogram Transformer gets its
    extractor's filter bank (`KaldiFilterBank`). The hidden states are averaged and
    projected to `embed_dim`.
    """

    def __init__(self, config: EncoderConfig, embed_dim: int, audio: AudioConfig, *, allow_downloads: bool = False) -> None:
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoModel

        from mmkd.models.text import _not_found, transformer_blocks

        name = config.pretrained or ""
        try:
            self.backbone = AutoModel.from_pretrained(name, local_files_only=not allow_downloads)
            extractor = AutoFeatureExtractor.from_pretrained(name, local_files_only=not allow_downloads)
        except OSError as exc:
            raise _not_found("pretrained audio model", name, exc) from None
        self.scale = extractor.sampling_rate / audio.sample_rate_hz
        self.filter_bank = KaldiFilterBank(extractor) if hasattr(extractor, "mel_filters") else None
        self.normalize = self.filter_bank is None and bool(getattr(extractor, "do_normalize", False))
        self.proj = nn.Linear(self.backbone.config.hidden_size, embed_dim)
        if config.trainable_blocks is not None:
            for parameter in self.backbone.parameters():
                parameter.requires_grad_(False)
            blocks = list(transformer_blocks(self.backbone))
            for block in blocks[len(blocks) - config.trainable_blocks:] if config.trainable_blocks else []:
                for parameter in block.parameters():
                    parameter.requires_grad_(True)

    def adapt(self, waveform: torch.Tensor) -> torch.Tensor:
        """Resample (batch, samples) waveforms to the model's rate and normalise them as its extractor would."""
        x = waveform
        if self.scale != 1.0:
            x = nn.functional.interpolate(x.unsqueeze(1), scale_factor=self.scale, mode="linear",
                                          align_corners=False).squeeze(1)
        if self.filter_bank is not None:
            return self.filter_bank(x)
        if self.normalize:
            mean = x.mean(dim=1, keepdim=True)
            variance = x.var(dim=1, keepdim=True, unbiased=False)
            x = (x - mean) / torch.sqrt(variance + 1e-7)
        return x

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_values=self.adapt(waveform)).last_hidden_state
        return self.proj(hidden.mean(dim=1))
