"""Parameter-efficient training: frozen layers chosen by name, and LoRA adapters (peft) on transformer encoders."""

from __future__ import annotations

import copy
import logging

from torch import nn

from mmkd.config import LoraSettings
from mmkd.errors import ConfigError

logger = logging.getLogger(__name__)


def freeze(model: nn.Module, prefixes: list[str]) -> dict[str, int]:
    """Stop training every parameter whose name starts with one of `prefixes`; return the count per prefix.

    Raises:
        ConfigError: a prefix names no parameter; the message lists the names it could start with.
    """
    counts = {}
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        chosen = [p for name, p in model.named_parameters() if name == prefix or name.startswith(prefix.rstrip(".") + ".")]
        if not chosen:
            near = sorted({".".join(name.split(".")[:2]) for name in names})
            raise ConfigError(f"freeze: {prefix!r} names no parameter of the model; names start with {', '.join(near)}")
        for parameter in chosen:
            parameter.requires_grad_(False)
        counts[prefix] = sum(p.numel() for p in chosen)
    if counts:
        logger.info("Frozen: %s", ", ".join(f"{prefix} ({count:,} parameters)" for prefix, count in counts.items()))
    return counts


def transformer_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Return (owner, attribute) of each transformers model among `model`'s encoders."""
    from transformers import PreTrainedModel

    slots = []
    for encoder in getattr(model, "encoders", {}).values():
        for attribute in ("transformer", "backbone"):
            inner = getattr(encoder, attribute, None)
            if isinstance(inner, PreTrainedModel) or _is_lora(inner):
                slots.append((encoder, attribute))
    return slots


def _is_lora(module: object) -> bool:
    return type(module).__name__ == "PeftModel"


def add_lora(model: nn.Module, settings: LoraSettings) -> int:
    """Wrap each transformer encoder of `model` in LoRA adapters; its own weights stop training.

    Returns the number of adapter parameters.

    Raises:
        ConfigError: the model has no transformer encoder, or peft is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("lora needs peft: pip install 'mmkd[lora]'") from error
    slots = transformer_slots(model)
    if not slots:
        raise ConfigError("lora: the model has no transformer encoder (text, or a transformers image or audio model) "
                          "to put adapters on; remove lora or use such an encoder")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules))
    added = 0
    for owner, attribute in slots:
        wrapped = get_peft_model(getattr(owner, attribute), config)
        setattr(owner, attribute, wrapped)
        added += sum(p.numel() for name, p in wrapped.named_parameters() if "lora_" in name)
    logger.info("LoRA rank %d on %s: %d adapter parameters", settings.rank, ", ".join(settings.target_modules), added)
    return added


def merged(model: nn.Module) -> nn.Module:
    """Return `model`, or a copy with its LoRA adapters folded into the weights they adapt, for export."""
    slots = [(owner, attribute) for owner, attribute in transformer_slots(model) if _is_lora(getattr(owner, attribute))]
    if not slots:
        return model
    model = copy.deepcopy(model)
    for owner, attribute in transformer_slots(model):
        if _is_lora(getattr(owner, attribute)):
            setattr(owner, attribute, getattr(owner, attribute).merge_and_unload())
    return model
