"""The multimodal classifier shared by teacher, student and baseline."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from mmkd.config import MODEL_INPUTS, AudioConfig, ImageConfig, ModelConfig
from mmkd.models.adapters import add_lora, freeze
from mmkd.models.encoders import AudioEncoder, ResNetEncoder
from mmkd.registry import get_registry


class MultimodalClassifier(nn.Module):
    """One encoder per modality, a fusion plugin and a linear classification head.

    `forward(*inputs, mask)` takes each modality's tensors in `modalities` order (images
    (batch, channels, size, size); waveforms (batch, samples); for text, token ids and
    attention mask, both (batch, tokens)) and a (batch, modalities) bool mask, and
    returns `(logits, embedding)` where `embedding` is the fused feature. This positional
    signature is also the ONNX model's, with inputs named as in `MODEL_INPUTS` and "mask".
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        modalities: list[str],
        num_classes: int,
        image: ImageConfig,
        audio: AudioConfig,
        vocab_size: int | None = None,
        allow_downloads: bool = False,
        init_text_from: str | None = None,
    ) -> None:
        super().__init__()
        self.modalities = list(modalities)
        encoders: dict[str, nn.Module] = {}
        for modality in self.modalities:
            if modality == "image" and config.image_encoder.pretrained is not None:
                from mmkd.models.pretrained import PretrainedImageEncoder

                encoders[modality] = PretrainedImageEncoder(config.image_encoder, config.embed_dim, image,
                                                            allow_downloads=allow_downloads)
            elif modality == "image":
                encoders[modality] = ResNetEncoder(image.channels, config.image_encoder, config.embed_dim)
            elif modality == "audio" and config.audio_encoder.pretrained is not None:
                from mmkd.models.pretrained import PretrainedAudioEncoder

                encoders[modality] = PretrainedAudioEncoder(config.audio_encoder, config.embed_dim, audio,
                                                            allow_downloads=allow_downloads)
            elif modality == "audio":
                encoders[modality] = AudioEncoder(audio, config.audio_encoder, config.embed_dim)
            elif modality == "text":
                from mmkd.models.text import TextEncoder

                if vocab_size is None and config.text_encoder.pretrained is None:
                    raise ValueError("a new text encoder needs vocab_size, the tokenizer's vocabulary size")
                encoders[modality] = TextEncoder(
                    config.text_encoder, config.embed_dim, vocab_size=vocab_size or 0,
                    allow_downloads=allow_downloads, init_from=init_text_from,
                )
            else:
                raise ValueError(f"no encoder for modality {modality!r}; built in: image, audio, text")
        self.encoders = nn.ModuleDict(encoders)
        fusion_cls = get_registry("fusion").get(config.fusion.name)
        self.fusion = fusion_cls([config.embed_dim] * len(self.modalities), fusion_cls.Params(**config.fusion.params))
        self.embedding_dim = self.fusion.output_dim
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(self.fusion.output_dim, num_classes))
        self.embed_dim = config.embed_dim
        self.modality_features: list[torch.Tensor] = []
        if config.lora is not None:
            add_lora(self, config.lora)
        if config.freeze:
            freeze(self, config.freeze)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding, _ = self.forward_with_modalities(*args)
        return logits, embedding

    def forward_with_modalities(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (logits, fused embedding, modality embeddings of shape (batch, modalities, embed_dim)).

        A row that lacks a modality still gets that encoder's embedding of its blank input;
        the mask keeps it out of the fused embedding.
        """
        *inputs, mask = args
        features = []
        position = 0
        for modality in self.modalities:
            count = len(MODEL_INPUTS[modality])
            features.append(self.encoders[modality](*inputs[position : position + count]))
            position += count
        if self.training:
            # Kept for loss terms that align one modality's embedding with another's.
            self.modality_features = features
        embedding = self.fusion(features, mask)
        return self.head(embedding), embedding, torch.stack(features, dim=1)


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable and frozen parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


def fingerprint_model(model: nn.Module, extra: Any = None) -> str:
    """Hash the weights, buffers and `extra` (e.g. the architecture config) of a model."""
    digest = hashlib.sha256(repr(extra).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
