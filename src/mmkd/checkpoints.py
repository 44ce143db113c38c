"""Build the teacher, student and baseline from the config; save and load their checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from mmkd import __version__
from mmkd.config import ModelConfig, RunConfig, StudentConfig, TeacherConfig
from mmkd.models.multimodal import MultimodalClassifier, count_parameters, fingerprint_model
from mmkd.runs import atomic_torch_save

ROLES = ("teacher", "student", "baseline")


def build_model(config: RunConfig, role: str, classes: list[str]) -> MultimodalClassifier:
    """Return an untrained model for `role`: "teacher", "student" or "baseline"."""
    model_config: ModelConfig = config.teacher if role == "teacher" else config.student
    modalities = list(config.data.modalities) if role == "teacher" else config.student_modalities
    return _classifier(model_config, modalities, len(classes), config)


def _classifier(model_config: ModelConfig, modalities: list[str], num_classes: int, config: RunConfig) -> MultimodalClassifier:
    vocab_size = None
    if "text" in modalities:
        from mmkd.models.text import load_tokenizer

        vocab_size = len(load_tokenizer(config.data.text.tokenizer, allow_downloads=config.allow_downloads))
    return MultimodalClassifier(
        model_config,
        modalities=modalities,
        num_classes=num_classes,
        image=config.data.image,
        audio=config.data.audio,
        vocab_size=vocab_size,
        allow_downloads=config.allow_downloads,
        init_text_from=config.teacher.text_encoder.pretrained,
    )


def save_checkpoint(path: Path, model: MultimodalClassifier, config: RunConfig, role: str, classes: list[str], **extra) -> dict:
    """Save the weights with everything needed to rebuild and trust them; return the metadata."""
    model_config = config.teacher if role == "teacher" else config.student
    architecture = ModelConfig.model_validate(model_config.model_dump(include=set(ModelConfig.model_fields)))
    metadata = {
        "role": role,
        "classes": classes,
        "modalities": model.modalities,
        "architecture": architecture.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json", include={"image", "audio", "modalities"}),
        "params": count_parameters(model),
        "fingerprint": fingerprint_model(model, architecture.model_dump(mode="json")),
        "config_fingerprint": config.fingerprint(),
        "mmkd_version": __version__,
        **extra,
    }
    atomic_torch_save(path, {"state_dict": model.state_dict(), "metadata": metadata})
    return metadata


def load_checkpoint(path: Path, config: RunConfig) -> tuple[MultimodalClassifier, dict]:
    """Rebuild a model from a checkpoint written by `save_checkpoint`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    metadata = payload["metadata"]
    architecture = ModelConfig.model_validate(metadata["architecture"])
    model_config = TeacherConfig(**architecture.model_dump()) if metadata["role"] == "teacher" else StudentConfig(**architecture.model_dump())
    # The saved weights replace any copied from the teacher, so none are copied here.
    model_config.text_encoder.init_from_layers = None
    model = _classifier(model_config, metadata["modalities"], len(metadata["classes"]), config)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, metadata
