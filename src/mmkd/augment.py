"""Controls against overfitting that act on a training batch: augmentation and adversarial copies.

Both draw from torch's global random number generator, which the training state saves,
so a resumed stage draws the same changes as one that was never stopped. Neither is
part of the model: validation, evaluation and the exported ONNX model see the rows as
they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchvision.transforms import v2

from mmkd.config import MODEL_INPUTS, AdversarialConfig, AugmentConfig, ImageConfig

# (inputs, labels, row positions) -> (loss, named terms): one training forward pass.
StepFn = Callable[[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def input_positions(modalities: list[str]) -> dict[str, int]:
    """Map each model input's name to its position in the model's positional inputs."""
    names = [name for modality in modalities for name in MODEL_INPUTS[modality]]
    return {name: index for index, name in enumerate(names)}


class Augmenter:
    """Random per-row changes to a training batch, by modality, as the run's `augment` section sets them.

    Spectrogram masks (SpecAugment) act on the output of the audio encoder's log-mel front
    end, through a forward hook that `attach` adds and that works only in training mode. An
    audio model without that front end gets its time masks on the waveform instead.
    """

    def __init__(self, config: AugmentConfig, modalities: list[str], image: ImageConfig, hop_length: int):
        self.config, self.modalities, self.hop_length = config, modalities, hop_length
        self.positions = input_positions(modalities)
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.spectrogram_masks = False
        self.image_transform = self._image_transform(config, image) if "image" in modalities else None
        audio = config.audio
        self.audio_active = "audio" in modalities and bool(
            audio.time_masks or audio.freq_masks or audio.gain_db or audio.noise_snr_db is not None
        )
        self.text_active = "text" in modalities and config.text.token_dropout > 0

    @staticmethod
    def _image_transform(config: AugmentConfig, image: ImageConfig) -> v2.Transform | None:
        settings = config.image
        # Pixels that appear at the borders get the value black has after normalisation.
        background = -image.mean / image.std
        steps: list[v2.Transform] = []
        if settings.degrees or settings.translate or settings.scale is not None:
            steps.append(v2.RandomAffine(degrees=settings.degrees, translate=(settings.translate, settings.translate),
                                         scale=settings.scale, fill=background))
        if settings.crop_padding:
            steps.append(v2.RandomCrop(image.size, padding=settings.crop_padding, fill=background))
        return v2.Compose(steps) if steps else None

    @property
    def active(self) -> bool:
        return self.image_transform is not None or self.audio_active or self.text_active

    def attach(self, model: nn.Module) -> None:
        """Add the spectrogram-mask hook to `model`'s audio front end, when it has one."""
        audio = self.config.audio
        encoders = getattr(model, "encoders", None)
        encoder = encoders["audio"] if encoders is not None and "audio" in encoders else None
        front_end = getattr(encoder, "front_end", None)
        if front_end is not None and (audio.time_masks or audio.freq_masks):
            self.hooks.append(front_end.register_forward_hook(self._mask_spectrogram))
            self.spectrogram_masks = True

    def detach(self) -> None:
        """Remove the hooks `attach` added."""
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.spectrogram_masks = [], False

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Return the batch with each modality's changes applied, row by row."""
        changed = list(inputs)
        if self.image_transform is not None:
            at = self.positions["image"]
            changed[at] = torch.stack([self.image_transform(row) for row in changed[at]])
        if self.audio_active:
            at = self.positions["audio"]
            changed[at] = self._change_waveforms(changed[at])
        if self.text_active:
            at = self.positions["attention_mask"]
            keep = torch.rand(changed[at].shape, device=changed[at].device) >= self.config.text.token_dropout
            keep[:, 0] = True
            changed[at] = changed[at] * keep.to(changed[at].dtype)
        return tuple(changed)

    def _change_waveforms(self, waveforms: torch.Tensor) -> torch.Tensor:
        audio = self.config.audio
        rows = waveforms.shape[0]
        if audio.gain_db:
            decibels = (torch.rand(rows, 1, device=waveforms.device) * 2 - 1) * audio.gain_db
            waveforms = waveforms * torch.pow(10.0, decibels / 20)
        if audio.noise_snr_db is not None:
            power = waveforms.pow(2).mean(dim=1, keepdim=True)
            noise = torch.randn_like(waveforms) * torch.sqrt(power / 10 ** (audio.noise_snr_db / 10))
            waveforms = waveforms + noise
        if audio.time_masks and not self.spectrogram_masks:
            waveforms = _mask_bands(waveforms.unsqueeze(1), dim=2, count=audio.time_masks,
                                    widest=audio.time_mask_frames * self.hop_length, fill=0.0).squeeze(1)
        return waveforms

    def _mask_spectrogram(self, module: nn.Module, inputs, spectrogram: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        audio = self.config.audio
        # (batch, 1, mel bands, frames): masked bands take each spectrogram's mean.
        fill = spectrogram.mean(dim=(1, 2, 3), keepdim=True)
        masked = _mask_bands(spectrogram, dim=2, count=audio.freq_masks, widest=audio.freq_mask_bins, fill=fill)
        return _mask_bands(masked, dim=3, count=audio.time_masks, widest=audio.time_mask_frames, fill=fill)


def _mask_bands(values: torch.Tensor, *, dim: int, count: int, widest: int, fill) -> torch.Tensor:
    """Set `count` bands of random width in [0, widest] along `dim` of each row to `fill`."""
    if count == 0:
        return values
    rows, length = values.shape[0], values.shape[dim]
    positions = torch.arange(length, device=values.device)
    masked = torch.zeros(rows, length, dtype=torch.bool, device=values.device)
    for _ in range(count):
        width = torch.randint(0, min(widest, length) + 1, (rows, 1), device=values.device)
        start = (torch.rand(rows, 1, device=values.device) * (length - width + 1)).floor().long()
        masked |= (positions >= start) & (positions < start + width)
    shape = [rows] + [1] * (values.dim() - 1)
    shape[dim] = length
    fill = torch.as_tensor(fill, dtype=values.dtype, device=values.device)
    return torch.where(masked.view(shape), fill.expand_as(values) if fill.dim() else fill, values)


class Adversary:
    """Adds adversarial copies of a batch's rows to it, so each step trains on both.

    Continuous inputs (images, waveforms) move by signed gradient steps inside an L-inf
    ball. Text moves its word embeddings (FreeLB-style) along their normalised gradient
    inside an L2 ball per token, through a forward hook on the embedding layer. The
    ascent passes leave batch-norm statistics as they were.
    """

    def __init__(self, config: AdversarialConfig, model: nn.Module):
        self.config, self.model = config, model
        positions = input_positions(model.modalities)
        epsilons = {"image": config.image_epsilon, "audio": config.audio_epsilon}
        self.continuous = {positions[m]: epsilons[m] for m in ("image", "audio") if m in positions and epsilons[m] > 0}
        self.embedding = None
        if "text" in model.modalities and config.text_epsilon > 0:
            self.embedding = model.encoders["text"].transformer.get_input_embeddings()
        if not self.continuous and self.embedding is None:
            raise ValueError("adversarial training has nothing to perturb: every epsilon of the model's modalities is 0")
        self.text_delta: torch.Tensor | None = None
        self.pad_rows = 0  # rows before the perturbed ones in the batch the hook receives

    def extend(self, step: StepFn, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, rows: torch.Tensor):
        """Return (inputs, labels, rows) with an adversarial copy of every row after the originals."""
        config = self.config
        size = 1.0 if config.method == "fgsm" else config.step_fraction
        steps = 1 if config.method == "fgsm" else config.steps
        deltas = {i: self._start(inputs[i], eps) for i, eps in self.continuous.items()}
        hook = self.embedding.register_forward_hook(self._add_text_delta) if self.embedding is not None else None
        saved_buffers = [b.clone() for b in self.model.buffers()]
        try:
            self.text_delta, self.pad_rows = None, 0
            for _ in range(steps):
                if self.embedding is not None and self.text_delta is None:
                    self.text_delta = self._text_start(inputs)
                leaves = [*deltas.values(), *([self.text_delta] if self.text_delta is not None else [])]
                for leaf in leaves:
                    leaf.requires_grad_(True)
                perturbed = tuple(x + deltas[i] if i in deltas else x for i, x in enumerate(inputs))
                loss, _ = step(perturbed, labels, rows)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for (i, delta), grad in zip(deltas.items(), grads, strict=False):
                    eps = self.continuous[i]
                    moved = delta.detach() + (size * eps * grad.sign() if grad is not None else 0)
                    deltas[i] = moved.clamp(-eps, eps)
                if self.text_delta is not None:
                    self.text_delta = self._text_step(self.text_delta.detach(), grads[-1], size)
            for buffer, value in zip(self.model.buffers(), saved_buffers, strict=True):
                buffer.copy_(value)
        finally:
            if hook is not None:
                hook.remove()
        adversarial = tuple(torch.cat([x, x + deltas[i].detach()]) if i in deltas else torch.cat([x, x])
                            for i, x in enumerate(inputs))
        self.pad_rows = len(labels)
        return adversarial, torch.cat([labels, labels]), torch.cat([rows, rows])

    def hook_training_pass(self) -> torch.utils.hooks.RemovableHandle | None:
        """Add the last text perturbation to the second half of the next forward pass; remove the handle after it."""
        if self.embedding is None or self.text_delta is None:
            return None
        return self.embedding.register_forward_hook(self._add_text_delta)

    def _start(self, values: torch.Tensor, eps: float) -> torch.Tensor:
        if self.config.method == "pgd":
            return (torch.rand_like(values) * 2 - 1) * eps
        return torch.zeros_like(values)

    def _text_start(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        positions = input_positions(self.model.modalities)
        ids = inputs[positions["input_ids"]]
        width = self.embedding.embedding_dim
        start = torch.zeros(*ids.shape, width, device=ids.device)
        if self.config.method == "pgd":
            start = self._project(torch.randn_like(start) * self.config.text_epsilon / math.sqrt(width))
        return start

    def _text_step(self, delta: torch.Tensor, grad: torch.Tensor | None, size: float) -> torch.Tensor:
        if grad is None:
            return delta
        norm = grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self._project(delta + size * self.config.text_epsilon * grad / norm)

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        norm = delta.norm(dim=-1, keepdim=True)
        return delta * torch.clamp(self.config.text_epsilon / norm.clamp_min(1e-12), max=1.0)

    def _add_text_delta(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        delta = self.text_delta.to(output.dtype)
        if self.pad_rows:
            delta = torch.cat([torch.zeros_like(delta), delta])
        return output + delta
