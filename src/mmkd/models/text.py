"""Text encoders: a pretrained transformers model, or a small BERT-style encoder built from a config.

Both take token ids and an attention mask and return one embedding per row: the hidden
states pooled (first token, masked mean or learned attention) and projected to the
model's embedding width. Pretrained weights and tokenizers are read with transformers'
`from_pretrained`, from a local folder or a hub id. With downloads off, only local
folders and the Hugging Face cache are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mmkd.config import TextEncoderConfig
from mmkd.errors import ConfigError

# The inputs a text modality contributes to a model, in order.
TEXT_INPUTS = ("input_ids", "attention_mask")


def _not_found(kind: str, name: str, exc: Exception) -> ConfigError:
    cache = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    return ConfigError(
        f"{kind} {name!r} was not found: it is not a local folder, and downloads are off, so only the Hugging Face "
        f"cache ({cache}) was searched ({type(exc).__name__}: {str(exc).splitlines()[0]}). Point the config at a "
        "folder holding config.json and the weights (or tokenizer files), copy the model into that cache, or set "
        "allow_downloads: true with HF_HUB_OFFLINE=0 in the environment."
    )


def load_pretrained_model(name: str, *, allow_downloads: bool) -> nn.Module:
    """Load a transformers AutoModel from a folder or hub id; for a CLIP model, its text tower.

    Raises:
        ConfigError: the model is neither a folder nor available without a download.
    """
    from transformers import AutoConfig, AutoModel, CLIPTextModel

    try:
        if AutoConfig.from_pretrained(name, local_files_only=not allow_downloads).model_type == "clip":
            return CLIPTextModel.from_pretrained(name, local_files_only=not allow_downloads)
        return AutoModel.from_pretrained(name, local_files_only=not allow_downloads)
    except OSError as exc:
        raise _not_found("pretrained model", name, exc) from None


def load_tokenizer(name: str, *, allow_downloads: bool):
    """Load a transformers AutoTokenizer (a fast, Rust-backed one) from a folder or hub id.

    Raises:
        ConfigError: the tokenizer is neither a folder nor available without a download.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=not allow_downloads, use_fast=True)
    except OSError as exc:
        raise _not_found("tokenizer", name, exc) from None


def prefetch(config) -> None:
    """Download the config's tokenizer and pretrained text encoders into the Hugging Face cache.

    Does nothing unless the config allows downloads; afterwards every stage reads them
    from the cache without network access.
    """
    if not config.allow_downloads or "text" not in config.data.modalities:
        return
    load_tokenizer(config.data.text.tokenizer, allow_downloads=True)
    for model in (config.teacher, config.student):
        if model.text_encoder.pretrained is not None:
            load_pretrained_model(model.text_encoder.pretrained, allow_downloads=True)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the stack of transformer blocks of a transformers model (BERT, ViT, wav2vec2 and similar)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "blocks", "transformer.layer"):
        current: object = model
        for part in path.split("."):
            current = getattr(current, part, None)
        if isinstance(current, nn.ModuleList):
            return current
    raise ConfigError(f"{type(model).__name__} has no encoder.layer or layers list; trainable_blocks cannot be applied")


class AttentionPooling(nn.Module):
    """Weighted mean of the hidden states, with weights from a learned scoring vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.score = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(hidden).squeeze(-1).masked_fill(~mask, torch.finfo(hidden.dtype).min)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (weights * hidden).sum(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str, attention: AttentionPooling | None) -> torch.Tensor:
    """Reduce (batch, tokens, width) hidden states to (batch, width)."""
    mask = attention_mask.bool()
    if method == "cls":
        return hidden[:, 0]
    if method == "attention":
        return attention(hidden, mask)  # type: ignore[misc]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    # A row without tokens (its text is missing) gets zeros rather than a division by zero.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextEncoder(nn.Module):
    """A transformer over token ids, pooled and projected to `embed_dim`.

    Args:
        config: The encoder's settings: pretrained name or the size of a new encoder,
            pooling and which blocks train.
        embed_dim: Width of the returned embedding.
        vocab_size: Vocabulary of the tokenizer; sizes a new encoder's embedding table.
        allow_downloads: Whether a hub id may be downloaded.
        init_from: For a new encoder, a pretrained model whose embeddings and chosen
            blocks (`config.init_from_layers`) it copies, as DistilBERT was initialised.
    """

    def __init__(
        self, config: TextEncoderConfig, embed_dim: int, *, vocab_size: int, allow_downloads: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if config.pretrained is not None:
            self.transformer = load_pretrained_model(config.pretrained, allow_downloads=allow_downloads)
        else:
            from transformers import BertConfig, BertModel

            settings = BertConfig(
                vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.layers,
                num_attention_heads=config.heads, intermediate_size=config.intermediate_size or 4 * config.hidden_size,
                max_position_embeddings=config.max_positions,
            )
            self.transformer = BertModel(settings, add_pooling_layer=False)
            if config.init_from_layers:
                if init_from is None:
                    raise ConfigError("text_encoder.init_from_layers needs the teacher's text_encoder.pretrained")
                copy_teacher_layers(self.transformer, load_pretrained_model(init_from, allow_downloads=allow_downloads),
                                    config.init_from_layers)
        width = self.transformer.config.hidden_size
        self.pooling = config.pooling
        self.attention = AttentionPooling(width) if config.pooling == "attention" else None
        self.proj = nn.Linear(width, embed_dim)
        if config.trainable_blocks is not None:
            for parameter in self.transformer.parameters():
                parameter.requires_grad_(False)
            blocks = transformer_blocks(self.transformer)
            for block in list(blocks)[len(blocks) - config.trainable_blocks:] if config.trainable_blocks else []:
                for parameter in block.parameters():
                    parameter.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(pool(hidden, attention_mask, self.pooling, self.attention))


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, layers: list[int]) -> None:
    """Copy the embeddings and blocks `layers` of `teacher` into `student`'s blocks 0, 1, ...

    Raises:
        ConfigError: the two differ in width, or a layer index is out of range.
    """
    teacher_blocks, student_blocks = transformer_blocks(teacher), transformer_blocks(student)
    if len(layers) != len(student_blocks):
        raise ConfigError(f"init_from_layers names {len(layers)} teacher layers for a student of {len(student_blocks)}")
    if any(not 0 <= i < len(teacher_blocks) for i in layers):
        raise ConfigError(f"init_from_layers {layers}: the teacher has layers 0 to {len(teacher_blocks) - 1}")
    try:
        student.embeddings.load_state_dict(teacher.embeddings.state_dict())
        for target, source in zip(student_blocks, layers, strict=True):
            target.load_state_dict(teacher_blocks[source].state_dict())
    except (RuntimeError, AttributeError) as exc:
        raise ConfigError(
            "init_from_layers needs a student with the teacher's hidden size, heads, intermediate size and "
            f"vocabulary: {str(exc).splitlines()[0]}"
        ) from None
