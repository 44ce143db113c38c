"""The YAML run config: pydantic models with bounds, descriptions and no unknown keys.

Example:
    >>> from mmkd.config import load_config
    >>> config = load_config("configs/avdigits.yaml")  # doctest: +SKIP
    >>> config.teacher.fusion.name
    'attention'
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mmkd.errors import ConfigError, PluginError

MODALITIES = ("image", "audio")  # the default of data.modalities; "text" is also accepted

# Settings that choose in how many processes, or on which cluster, work runs, never what it computes.
PLACEMENT_SETTINGS = ("data.decode_workers", "extract.workers", "extract.cluster_address")

# The tensors each modality feeds a model, in order; they are also the ONNX input names.
MODEL_INPUTS = {"image": ("image",), "audio": ("audio",), "text": ("input_ids", "attention_mask")}


def input_names(modalities: list[str]) -> list[str]:
    """Return the model input names of `modalities`, in order, without the modality mask."""
    return [name for modality in modalities for name in MODEL_INPUTS[modality]]


def modalities_of(names: list[str]) -> list[str]:
    """Return the modalities whose inputs are all among `names`, in the order they appear there."""
    found = []
    for name in names:
        for modality, inputs in MODEL_INPUTS.items():
            if name == inputs[0] and set(inputs) <= set(names):
                found.append(modality)
    return found


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AudioConfig(_Strict):
    """Audio decoding and the log-mel front end's parameters."""

    sample_rate_hz: int = Field(8000, ge=1000, le=96000, description="Expected sample rate of every recording.")
    max_seconds: float = Field(
        1.35, gt=0, le=60, description="Recordings are zero-padded or centre-cropped to this length."
    )
    n_fft: int = Field(256, ge=16, le=8192, description="FFT window length in samples.")
    hop_length: int = Field(128, ge=1, le=8192, description="Samples between successive frames.")
    n_mels: int = Field(40, ge=4, le=256, description="Mel bands of the spectrogram.")
    encodings: list[Literal["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64"]] = Field(
        default_factory=lambda: ["pcm16"],
        min_length=1,
        description="WAV sample encodings accepted and scaled to [-1, 1]; recordings in any other are rejected.",
    )
    resample: bool = Field(
        False, description="Resample recordings at another rate to sample_rate_hz instead of rejecting them."
    )
    downmix: bool = Field(
        False, description="Average the channels of multi-channel recordings instead of rejecting them."
    )

    @property
    def num_samples(self) -> int:
        return int(round(self.max_seconds * self.sample_rate_hz))


class ImageConfig(_Strict):
    """Image decoding parameters: images are converted to greyscale or RGB and resized."""

    size: int = Field(28, ge=8, le=1024, description="Images are resized to size x size pixels.")
    channels: Literal[1, 3] = Field(1, description="1 for greyscale, 3 for RGB.")
    mean: float = Field(0.1307, description="Mean subtracted after scaling pixels to [0, 1].")
    std: float = Field(0.3081, gt=0, description="Standard deviation divided by after the mean.")
    max_pixels: int = Field(
        64_000_000,
        ge=1,
        le=2**31 - 1,
        description="Images whose header declares more pixels are rejected before decoding (decompression bombs).",
    )


class TextConfig(_Strict):
    """Tokenization and limits of the inline text of a manifest's `text` column."""

    tokenizer: str | None = Field(
        None,
        description="Folder or Hugging Face hub id of the tokenizer that teacher and student share; "
        "needed when data.modalities has text. A folder is relative to the config file.",
    )
    max_length: int = Field(128, ge=2, le=8192, description="Texts are cut to this many tokens, special tokens included.")
    max_chars: int = Field(10_000, ge=1, le=10**8, description="Maximum length of a text, in characters.")
    max_tokens: int | None = Field(
        None, ge=1, le=10**7, description="Maximum length of a text, in whitespace-separated words; None for no limit."
    )


class DataConfig(_Strict):
    """Manifest location and the decoding of its rows into tensors."""

    manifest: Path = Field(description="CSV, JSONL or Parquet manifest; relative to the config file.")
    root: Path | None = Field(
        None, description="Folder the manifest's file paths are relative to; by default the manifest's folder."
    )
    modalities: list[Literal["image", "audio", "text"]] = Field(
        default_factory=lambda: list(MODALITIES), min_length=1, description="Modalities the models read."
    )
    classes: list[str] | None = Field(
        None, description="Class labels in output order; by default the sorted labels of the manifest."
    )
    split_fractions: dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15},
        description="Used only when the manifest has no split column.",
    )
    max_rows: int | None = Field(None, ge=1, description="Use only the first N rows (for smoke runs).")
    decode_workers: int = Field(
        0, ge=0, le=256,
        description="DataLoader worker processes that decode the files in parallel the first time a manifest is "
        "read; 0 decodes in the calling process. The decoded rows are cached, so later stages, epochs and runs "
        "decode no file. The result is the same for any number.",
    )
    image: ImageConfig = Field(default_factory=ImageConfig, description="Image decoding.")
    audio: AudioConfig = Field(default_factory=AudioConfig, description="Audio decoding and the log-mel front end.")
    text: TextConfig = Field(default_factory=TextConfig, description="Limits on inline text.")


class EncoderConfig(_Strict):
    """A ResNet-style convolutional encoder built here, or (for images) a pretrained backbone."""

    width: int = Field(16, ge=2, le=512, description="Channels of the first stage; each later stage doubles it.")
    blocks: list[int] = Field(
        default_factory=lambda: [2, 2, 2], min_length=1, max_length=6, description="Residual blocks per stage."
    )
    pretrained: str | None = Field(
        None,
        description="Images: torchvision:NAME or timm:NAME (e.g. torchvision:resnet18), or the folder or hub id of a "
        "transformers image model (ViT, CLIP vision, ...). Audio: the folder or hub id of a transformers speech "
        "model (wav2vec2, HuBERT, ...). None builds the ResNet-style encoder above.",
    )
    weights: str | None = Field(
        None,
        description="For torchvision and timm: a weights file (relative to the config file), default for the "
        "library's own pretrained weights, or None for random initialisation.",
    )
    input_size: int | None = Field(
        None, ge=8, le=4096,
        description="Side the image is resized to inside the model; None takes the model's own (224 for torchvision).",
    )
    pooling: Literal["cls", "mean", "attention"] = Field(
        "cls",
        description="For transformers image models: first token, mean of tokens or learned attention over them; "
        "speech models always take the mean.",
    )
    trainable_blocks: int | None = Field(
        None, ge=0, description="None trains every weight; N freezes the backbone except its last N blocks (0: frozen).",
    )

    @field_validator("blocks")
    @classmethod
    def _positive_blocks(cls, blocks: list[int]) -> list[int]:
        if any(b < 1 or b > 16 for b in blocks):
            raise ValueError(f"every stage needs 1 to 16 blocks, got {blocks}")
        return blocks


class TextEncoderConfig(_Strict):
    """A transformer text encoder: pretrained, or a small BERT-style one built from these sizes."""

    pretrained: str | None = Field(
        None,
        description="Folder or hub id of a transformers model (BERT, MiniLM, ...); a folder is relative to the "
        "config file. None builds a new encoder from layers, hidden_size and heads.",
    )
    layers: int = Field(2, ge=1, le=48, description="Blocks of a new encoder.")
    hidden_size: int = Field(128, ge=8, le=4096, description="Width of a new encoder.")
    heads: int = Field(2, ge=1, le=64, description="Attention heads of a new encoder; must divide hidden_size.")
    intermediate_size: int | None = Field(None, ge=8, le=16384, description="Feed-forward width; None is 4 x hidden_size.")
    max_positions: int = Field(512, ge=8, le=8192, description="Maximum number of tokens a new encoder accepts.")
    init_from_layers: list[int] | None = Field(
        None,
        description="Teacher blocks (0-based) copied into a new encoder's blocks, with the embeddings, as "
        "DistilBERT was initialised; needs the teacher's sizes and teacher.text_encoder.pretrained.",
    )
    pooling: Literal["cls", "mean", "attention"] = Field(
        "mean", description="How token states become one embedding: first token, masked mean, or learned attention."
    )
    trainable_blocks: int | None = Field(
        None, ge=0, description="None trains every weight; N freezes the transformer except its last N blocks (0: frozen).",
    )

    @model_validator(mode="after")
    def _check_heads(self) -> TextEncoderConfig:
        if self.pretrained is None and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of heads {self.heads}")
        return self


class PluginChoice(_Strict):
    """A plugin named from the registry and its parameters."""

    name: str = Field(description="Registered plugin name, as listed by `mmkd plugins list`.")
    params: dict[str, Any] = Field(default_factory=dict, description="The plugin's own parameters.")


class LossTerm(PluginChoice):
    """One named term of the distillation objective."""

    weight: float = Field(1.0, ge=0, le=1000, description="Weight of this term in the sum.")
    teacher_features: str = Field(
        "fused",
        description="The teacher features a feature term compares with: fused, the teacher's embedding of one "
        "modality (image, audio, text; for a student that reads only that modality), or layer:MODULE for a "
        "layer listed in extract.layers.",
    )


class AdversarialConfig(_Strict):
    """Adversarial training: each step also trains on perturbed copies of its rows."""

    method: Literal["fgsm", "pgd"] = Field(
        "pgd",
        description="fgsm: one signed-gradient step of the full size. pgd: `steps` smaller steps from a random "
        "start, projected back into the allowed size after each; on text, the steps move the word embeddings "
        "along their normalised gradient (FreeLB-style).",
    )
    image_epsilon: float = Field(0.1, ge=0, le=10, description="Largest change of a normalised pixel.")
    audio_epsilon: float = Field(0.002, ge=0, le=1, description="Largest change of a waveform sample (full scale is 1).")
    text_epsilon: float = Field(
        1.0, ge=0, le=100, description="Largest L2 norm of the change to each token's word embedding."
    )
    steps: int = Field(3, ge=1, le=100, description="Ascent steps of pgd; fgsm takes one.")
    step_fraction: float = Field(0.5, gt=0, le=1, description="Each pgd step's size, as a fraction of the epsilon.")


class TrainConfig(_Strict):
    """Optimiser and schedule for one training stage."""

    epochs: int = Field(10, ge=1, le=10000, description="Maximum epochs.")
    batch_size: int = Field(64, ge=1, le=65536, description="Rows per optimiser step.")
    lr: float = Field(2e-3, gt=0, le=10, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    schedule: Literal["one_cycle", "cosine", "constant"] = Field(
        "one_cycle",
        description="Learning rate schedule over all planned steps: one-cycle, linear warm-up then cosine decay "
        "to zero, or constant.",
    )
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="With the cosine schedule: share of the planned steps spent warming up linearly."
    )
    grad_clip_norm: float | None = Field(
        None, gt=0, description="Clip the gradients' total L2 norm to this before each step; None does not clip."
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1,
        description="Keep an exponential moving average of the weights with this decay (e.g. 0.999); validation, "
        "early stopping and the saved model then use the average.",
    )
    monitor: Literal["val_accuracy", "val_macro_f1", "val_loss"] = Field(
        "val_accuracy", description="Validation metric that picks the best epoch and drives early stopping."
    )
    patience: int = Field(4, ge=1, le=10000, description="Stop after this many epochs without a better monitored metric.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1,
        description="Label smoothing of the cross-entropy on labels (teacher, baseline, finetuning); distillation "
        "terms keep their own parameters.",
    )
    augment: bool = Field(True, description="Apply the run's `augment` settings to this stage's training rows.")
    adversarial: AdversarialConfig | None = Field(
        None,
        description="Train on adversarial copies of each batch as well as on the batch (the loss is averaged over "
        "both); None trains on the rows alone.",
    )
    checkpoint_every_steps: int = Field(
        200, ge=1, le=10**9,
        description="Save the training state every N optimiser steps, and at the end of each epoch, so a killed "
        "stage resumes where it was.",
    )


class ImageAugmentConfig(_Strict):
    """Random changes to training images (torchvision transforms v2), drawn per row."""

    degrees: float = Field(0.0, ge=0, le=180, description="Rotate by up to this many degrees either way.")
    translate: float = Field(0.0, ge=0, le=1, description="Shift by up to this fraction of the width and height.")
    scale: tuple[float, float] | None = Field(None, description="Zoom by a factor drawn from [low, high], e.g. [0.9, 1.1].")
    crop_padding: int = Field(0, ge=0, le=512, description="Pad by this many pixels, then crop back at a random place.")


class AudioAugmentConfig(_Strict):
    """Random changes to training recordings: SpecAugment masks on the log-mel spectrogram, gain and noise."""

    time_masks: int = Field(0, ge=0, le=100, description="Time masks per recording (SpecAugment).")
    time_mask_frames: int = Field(8, ge=1, le=10000, description="Widest time mask, in spectrogram frames.")
    freq_masks: int = Field(0, ge=0, le=100, description="Frequency masks per recording (SpecAugment).")
    freq_mask_bins: int = Field(6, ge=1, le=1000, description="Widest frequency mask, in mel bands.")
    gain_db: float = Field(0.0, ge=0, le=60, description="Change the loudness by up to this many decibels either way.")
    noise_snr_db: float | None = Field(
        None, ge=-20, le=100, description="Add white noise this many decibels below the recording's power."
    )


class TextAugmentConfig(_Strict):
    """Random changes to training texts."""

    token_dropout: float = Field(
        0.0, ge=0, lt=1, description="Hide each token but the first from attention with this probability."
    )


class AugmentConfig(_Strict):
    """Per-modality augmentation of training rows; everything is off by default."""

    image: ImageAugmentConfig = Field(default_factory=ImageAugmentConfig, description="Image augmentation.")
    audio: AudioAugmentConfig = Field(default_factory=AudioAugmentConfig, description="Audio augmentation.")
    text: TextAugmentConfig = Field(default_factory=TextAugmentConfig, description="Text augmentation.")


class LoraSettings(_Strict):
    """Low-rank adapters (peft's LoRA) on a model's transformer encoders."""

    rank: int = Field(8, ge=1, le=1024, description="Rank of each adapter.")
    alpha: float = Field(16.0, gt=0, le=4096, description="Scaling numerator; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        description="Names of the linear layers that get adapters (BERT and ViT: query, key, value, dense).",
    )


class ModelConfig(_Strict):
    """A multimodal classifier: one encoder per modality, a fusion plugin and a linear head."""

    image_encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="Encoder of the image modality.")
    audio_encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="Encoder of the audio modality (after the log-mel front end).")
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Encoder of the text modality.")
    embed_dim: int = Field(64, ge=2, le=4096, description="Width of each modality embedding.")
    fusion: PluginChoice = Field(default_factory=lambda: PluginChoice(name="concat"), description="Fusion plugin combining the modality embeddings.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classification head.")
    freeze: list[str] = Field(
        default_factory=list,
        description="Freeze the parameters whose names start with one of these prefixes, e.g. "
        "encoders.image.stem; `mmkd` logs how many each prefix froze.",
    )
    lora: LoraSettings | None = Field(
        None,
        description="Finetune the transformer encoders (text, and pretrained transformers image or audio models) "
        "through LoRA adapters (peft): their own weights are frozen and the adapters are merged into them for export.",
    )


class TeacherConfig(ModelConfig):
    """The teacher: trained here unless `checkpoint` names one trained before."""

    embed_dim: int = Field(128, ge=2, le=4096, description="Width of each modality embedding.")
    fusion: PluginChoice = Field(
        default_factory=lambda: PluginChoice(name="attention", params={"dim": 128, "heads": 4}),
        description="Fusion plugin combining the modality embeddings.",
    )
    checkpoint: Path | None = Field(None, description="A teacher.pt from an earlier run; skips teacher training.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=12, lr=3e-3), description="Teacher training schedule.")


class StudentConfig(ModelConfig):
    """The small student; the baseline student has the same architecture."""

    image_encoder: EncoderConfig = Field(
        default_factory=lambda: EncoderConfig(width=8, blocks=[1, 1]), description="Encoder of the image modality."
    )
    audio_encoder: EncoderConfig = Field(
        default_factory=lambda: EncoderConfig(width=8, blocks=[1, 1]),
        description="Encoder of the audio modality (after the log-mel front end).",
    )
    embed_dim: int = Field(32, ge=2, le=4096, description="Width of each modality embedding.")
    modalities: list[Literal["image", "audio", "text"]] | None = Field(
        None,
        min_length=1,
        description="Modalities the student and the baseline read, a subset of data.modalities; "
        "None reads all. The teacher always reads all of them.",
    )


class AlignmentTerm(LossTerm):
    """One alignment term: an alignment plugin applied to two of the student's embeddings.

    By default it aligns the student's fused embedding (source) with the teacher's
    (target). With `modalities: [image, audio]` it aligns the student's image embedding
    with its audio embedding, on the rows that have both. The second modality is the
    target, so it gets no gradient from this term.
    """

    modalities: list[Literal["image", "audio", "text"]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Two modalities of the student to align with each other; None aligns the student with the teacher.",
    )


class ExtraTeacher(_Strict):
    """A further teacher, trained in an earlier run, whose logits join the distillation targets."""

    checkpoint: Path = Field(description="Its teacher.pt (relative to the config file); it may read fewer modalities.")
    weight: float = Field(1.0, gt=0, le=1000, description="Its weight in the average of the teachers' logits.")


class DistillConfig(_Strict):
    """Distillation of the student against stored teacher outputs."""

    losses: list[LossTerm] = Field(
        default_factory=lambda: [
            LossTerm(name="hinton", weight=1.0, params={"temperature": 4.0, "alpha": 0.9}),
            LossTerm(name="mse", weight=0.5),
        ],
        min_length=1,
        description="The objective: the weighted sum of these named loss terms.",
    )
    alignment: list[AlignmentTerm] = Field(
        default_factory=list,
        description="Alignment terms added to the objective: each aligns the student embedding with the teacher's.",
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=25, patience=8), description="Distillation schedule.")
    extra_teachers: list[ExtraTeacher] = Field(
        default_factory=list,
        description="Further teachers: the logit targets become the weighted average of every teacher's logits; "
        "feature terms still compare with the run's own teacher.",
    )
    teacher_weight: float = Field(1.0, gt=0, le=1000, description="Weight of the run's own teacher in that average.")
    nproc: int = Field(
        1, ge=1, le=1024,
        description="Processes that train the student together through torchrun (DistributedDataParallel; NCCL "
        "on GPUs, gloo on the CPU). Each reads batch_size / nproc rows per step, so results match one process.",
    )


class ExtractConfig(_Strict):
    """Teacher output extraction: storage type, shard and batch sizes, and stored layers."""

    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage type of the outputs; float16 halves the disk space and rounds each value.",
    )
    shard_rows: int = Field(
        4096, ge=1, le=10**7, description="Rows per shard file; an interrupted extraction loses at most one shard's work.",
    )
    batch_size: int = Field(256, ge=1, le=65536, description="Rows per teacher forward pass.")
    workers: int = Field(
        1, ge=1, le=4096,
        description="Dask workers that run the teacher on parts of the rows at once, each part a Prefect task "
        "(pip install 'mmkd[dask]'). 1 runs in the flow's process; more start a local Dask cluster of that many "
        "processes, on 127.0.0.1. The stored outputs are the same for any number.",
    )
    cluster_address: str | None = Field(
        None,
        description="Address of a running Dask scheduler (tcp://HOST:8786) to extract on, instead of a local "
        "cluster. Its workers need mmkd installed and must see the run folder and the feature store at the same paths.",
    )
    layers: list[str] = Field(
        default_factory=list,
        description="Teacher modules (names as in model.named_modules(), e.g. encoders.audio.encoder.stages.1) "
        "whose outputs, averaged over all positions, are stored too; a loss term reads one as layer:MODULE.",
    )


class FinetuneConfig(_Strict):
    """Supervised finetuning of the distilled student on labels."""

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, lr=2e-4, patience=2), description="Finetuning schedule.")


class ExportConfig(_Strict):
    """ONNX export of the student and the parity check against PyTorch."""

    opset: int = Field(18, ge=17, le=23, description="ONNX opset version.")
    parity_max_abs_diff: float = Field(
        1e-4, gt=0, le=1, description="Largest tolerated |ONNX - PyTorch| over every test logit."
    )
    variants: list[Literal["fp16", "int8_dynamic", "int8_static"]] = Field(
        default_factory=lambda: ["fp16", "int8_dynamic", "int8_static"],
        description="Smaller variants of the student to make with ONNX Runtime's tools; int8_static calibrates on the validation split.",
    )
    fp16_max_abs_diff: float = Field(
        0.1, gt=0, description="Largest tolerated |fp16 logit - fp32 logit| over the test split; the fp16 variant is deleted above it.",
    )
    max_accuracy_drop: float = Field(
        0.005, ge=0, le=1,
        description="Test accuracy a variant may lose against the float32 student (0.005 is half a point); a variant losing more is deleted.",
    )


class ReportConfig(_Strict):
    """The run report written at the end of each pipeline run (also by `mmkd report RUN_DIR`)."""

    enabled: bool = Field(True, description="Write report/report.html and report/report.md and publish the markdown "
                          "as a Prefect artifact at the end of each run.")
    map_rows: int = Field(1000, ge=4, le=100_000, description="At most this many test rows go into the embedding maps "
                          "and the layer similarity (CKA); t-SNE's time grows with the square of it.")
    examples: int = Field(8, ge=0, le=64, description="How many of the rows where the student and the teacher "
                          "disagree most are shown with their inputs.")


class TrackingConfig(_Strict):
    """Experiment tracking: TensorBoard event files in each run folder, and MLflow as an option."""

    tensorboard: bool = Field(True, description="Write TensorBoard events under <run>/tensorboard: each training "
                              "stage's per-epoch scalars, and the report's scores, figures and embedding projector.")
    mlflow: bool = Field(False, description="Log each run to MLflow: the config as parameters, test scores and "
                         "training curves as metrics, student.onnx, metrics.json and the report as artifacts "
                         "(pip install 'mmkd[mlflow]').")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; by default a local SQLite store, "
                                   "<out>/mlflow.db, with artifacts under <out>/mlartifacts.")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment; by default the config's name.")


class PromotionConfig(_Strict):
    """When a retrained student replaces the one in the model registry."""

    enabled: bool = Field(True, description="Run the promote stage at the end of each pipeline run.")
    registry: Path | None = Field(
        None, description="Folder of the promoted model and its history; by default registry/ beside the runs."
    )
    min_improvement: float = Field(
        0.0, ge=0, le=1,
        description="Test accuracy the new student must gain over the current one, both scored on the new test split.",
    )
    max_p50_ms: float | None = Field(
        None, gt=0, description="Latency budget: the ONNX student's batch-1 p50 in milliseconds must not exceed it.",
    )


class LabelRule(_Strict):
    """A label implied by another column of the manifest, which must equal the row's label.

    For file names such as `audio/7_jackson_12.wav`:

    ```yaml
    validation:
      label_rules:
        - column: audio
          pattern: '(?P<label>\\d)_[^/]*$'
    ```
    """

    column: str = Field(description="Manifest column that implies the label: image, audio, id or a metadata column.")
    pattern: str | None = Field(
        None,
        description=(
            "Regular expression searched in the cell: its group named 'label' (else its first group, else the "
            "whole match) is the implied label, and a cell it does not match is a problem. None: the cell is the label."
        ),
    )
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]+$", description="Check name in reports; by default label_from_<column>."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return pattern

    @property
    def check_name(self) -> str:
        """The name of this rule's check and of its columns in the probe table."""
        return self.name or "label_from_" + re.sub(r"\W", "_", self.column)


class ValidationConfig(_Strict):
    """Rules of the validate stage and the policy for rows that fail them."""

    on_failure: Literal["stop", "quarantine"] = Field(
        "stop", description="stop: fail the run on any critical problem. quarantine: set the bad rows aside."
    )
    max_quarantined_fraction: float = Field(
        0.05, ge=0, le=1, description="With quarantine, fail anyway when more than this fraction of rows is set aside."
    )
    min_rows_per_class: int = Field(1, ge=0, le=10**9, description="Minimum number of rows each class must keep.")
    min_rows_per_class_per_split: int = Field(
        1, ge=0, le=10**9, description="Minimum number of rows of each class in each split whose share in data.split_fractions is above 0."
    )
    max_class_imbalance: float = Field(
        10.0, ge=1, description="Warn when a split's largest class has more than this many times the rows of its smallest."
    )
    split_fraction_tolerance: float = Field(
        0.1, ge=0, le=1, description="Warn when a split's share of the rows differs from data.split_fractions by more."
    )
    min_modality_coverage: float = Field(
        0.5, ge=0, le=1, description="Fail when, in some split, a smaller fraction of rows has a modality the models read."
    )
    label_rules: list[LabelRule] = Field(
        default_factory=list, description="Labels implied by other columns, which must equal each row's label."
    )

    @model_validator(mode="after")
    def _unique_rule_names(self) -> ValidationConfig:
        names = [rule.check_name for rule in self.label_rules]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"validation.label_rules: two rules are named {repeated[0]!r}; give one of them a name")
        return self


class BenchmarkConfig(_Strict):
    """ONNX Runtime against PyTorch eager latency measurement."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32, 128], min_length=1, description="Batch sizes to time.")
    warmup: int = Field(10, ge=0, le=10000, description="Untimed runs before measuring.")
    iterations: int = Field(100, ge=5, le=100000, description="Timed runs per model, engine and batch size.")
    torch_compile: bool = Field(
        False, description="Also time torch.compile(model); compiling takes tens of seconds per batch size on a CPU.",
    )
    audio_seconds: list[float] = Field(
        default_factory=list,
        description="Further recording lengths in seconds to time, each cut or zero-padded; the trained length is always timed.",
    )
    text_tokens: list[int] = Field(
        default_factory=list,
        description="Further text lengths in tokens to time, each cut or padded; the dataset's length is always timed.",
    )
    max_seconds: float = Field(
        5.0, gt=0, description="Time spent timing one model, engine and batch size, after which it stops (at least 5 runs).",
    )
    threads: int = Field(1, ge=1, le=256, description="Intra-op threads for both engines, so they compete fairly.")
    providers: list[str] = Field(
        default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime providers to try, in order; the CPU provider is always the last resort.",
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Bind inputs and outputs on the provider's device before timing; auto does so on GPU providers.",
    )


class SearchRange(_Strict):
    """The values one setting may take in a search: a list of choices, or a range."""

    choices: list[Any] | None = Field(None, min_length=1, description="Values to choose from.")
    low: float | None = Field(None, description="Smallest value of a range.")
    high: float | None = Field(None, description="Largest value of a range.")
    log: bool = Field(False, description="Draw the range on a log scale (learning rates, weights).")
    integer: bool = Field(False, description="Draw whole numbers from the range.")

    @model_validator(mode="after")
    def _one_kind(self) -> SearchRange:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either choices, or low and high")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"a log range needs low above 0, got {self.low}")
        return self


# Config sections a search trial trains with; the teacher and the data stay fixed.
TUNABLE_SECTIONS = ("student", "distill", "augment")


class TuneConfig(_Strict):
    """Hyperparameter search over the student's training (`mmkd tune`): an Optuna study."""

    trials: int = Field(20, ge=1, le=100000, description="Trials to run; a resumed search runs only the missing ones.")
    space: dict[str, SearchRange] = Field(
        default_factory=dict,
        description="Settings to search, by dotted key (list items by index), e.g. distill.train.lr or "
        "distill.losses.0.params.temperature; keys lie under student, distill or augment.",
    )
    startup_trials: int = Field(3, ge=0, le=10000, description="Trials that run to the end before any is pruned.")
    warmup_epochs: int = Field(1, ge=0, le=10000, description="Epochs of each trial before it may be pruned.")


class RunConfig(_Strict):
    """The whole pipeline's config, as written in one YAML file."""

    name: str = Field("run", min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.-]+$", description="Run name, part of each run folder's name.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds model initialisation and batch order.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where models train: auto picks CUDA, then Apple's MPS, then the CPU."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision. auto: bfloat16 on GPUs that support it, float16 with a gradient scaler on "
        "other GPUs, float32 on the CPU. fp16 needs a GPU.",
    )
    channels_last: bool = Field(
        False, description="Train convolutional encoders in channels-last memory format (faster on recent GPUs)."
    )
    compile: bool = Field(False, description="Train through torch.compile; the first steps are slower while it compiles.")
    allow_downloads: bool = Field(
        False,
        description="Let pretrained models and tokenizers named by hub id be downloaded; needs HF_HUB_OFFLINE=0, "
        "which mmkd otherwise sets to 1.",
    )
    data: DataConfig = Field(description="The manifest and how rows are decoded.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher's architecture and training.")
    student: StudentConfig = Field(
        default_factory=StudentConfig, description="The student's architecture; the baseline uses the same."
    )
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="Teacher output extraction into the feature store.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="The distillation objective and schedule.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Finetuning on labels after distillation.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export settings.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Data validation rules and policy.")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig, description="Latency measurement settings.")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig, description="The gate before a retrained student is promoted.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="The run report.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard and MLflow.")
    feature_store: Path | None = Field(
        None, description="Folder of cached teacher outputs; by default feature-store/ beside the runs."
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="Per-modality augmentation of training rows, for the stages whose train.augment is true.",
    )
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyperparameter search settings (`mmkd tune`).")

    @model_validator(mode="after")
    def _check_plugins(self) -> RunConfig:
        from mmkd.registry import get_registry

        checks = [("teacher.fusion", "fusion", self.teacher.fusion), ("student.fusion", "fusion", self.student.fusion)]
        checks += [(f"distill.losses[{i}]", "losses", term) for i, term in enumerate(self.distill.losses)]
        checks += [(f"distill.alignment[{i}]", "alignment", term) for i, term in enumerate(self.distill.alignment)]
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            if model.audio_encoder.pretrained is not None and ":" in model.audio_encoder.pretrained:
                raise ValueError(f"{role}.audio_encoder.pretrained: {model.audio_encoder.pretrained!r} names a "
                                 "torchvision or timm model; audio takes the folder or hub id of a transformers "
                                 "speech model (wav2vec2, HuBERT, ...)")
        if "text" in self.data.modalities and self.data.text.tokenizer is None:
            raise ValueError(
                "data.text.tokenizer: data.modalities has text, so name the tokenizer folder or hub id "
                "(for a pretrained text teacher, usually the same as teacher.text_encoder.pretrained)"
            )
        chosen = self.student.modalities or []
        if not set(chosen) <= set(self.data.modalities) or len(set(chosen)) < len(chosen):
            raise ValueError(
                f"student.modalities: {chosen} must name each modality once, all of them in data.modalities "
                f"{self.data.modalities}"
            )
        student_modalities = self.student_modalities
        for key, term in [*(("losses", t) for t in self.distill.losses), *(("alignment", t) for t in self.distill.alignment)]:
            allowed = ["fused", *self.data.modalities, *(f"layer:{name}" for name in self.extract.layers)]
            if term.teacher_features not in allowed:
                raise ValueError(
                    f"distill.{key}: teacher_features {term.teacher_features!r} is not one of the teacher's modalities "
                    f"{self.data.modalities}; use one of {', '.join(allowed)} (a layer must be listed in extract.layers)"
                )
        for i, term in enumerate(self.distill.alignment):
            if term.modalities is None:
                continue
            if term.modalities[0] == term.modalities[1] or not set(term.modalities) <= set(student_modalities):
                raise ValueError(
                    f"distill.alignment[{i}].modalities: {term.modalities} must name two different modalities "
                    f"the student reads: {student_modalities}"
                )
        for key, kind, choice in checks:
            try:
                plugin = get_registry(kind).get(choice.name)
            except PluginError as exc:
                raise ValueError(f"{key}.name: {exc}") from None
            try:
                plugin.Params(**choice.params)
            except ValidationError as exc:
                raise ValueError(f"{key}.params: {_describe_errors(exc, plugin.Params)}") from None
        return self

    @model_validator(mode="after")
    def _check_search_space(self) -> RunConfig:
        dumped = self.model_dump(mode="json")
        for key in self.tune.space:
            if key.split(".")[0] not in TUNABLE_SECTIONS:
                raise ValueError(f"tune.space: {key!r} is outside the sections a trial trains "
                                 f"({', '.join(TUNABLE_SECTIONS)}); search those, the teacher and data stay fixed")
            _setting(dumped, key)
        return self

    @property
    def student_modalities(self) -> list[str]:
        """The modalities the student and the baseline read, in data.modalities order."""
        chosen = self.student.modalities or self.data.modalities
        return [m for m in self.data.modalities if m in chosen]

    def result_settings(self) -> dict[str, Any]:
        """Return the config as JSON values without PLACEMENT_SETTINGS: everything that decides a result."""
        dumped = self.model_dump(mode="json")
        for key in PLACEMENT_SETTINGS:
            section, name = key.split(".")
            del dumped[section][name]
        return dumped

    def fingerprint(self) -> str:
        """Return a short hash of the resolved config, stored with checkpoints and models.

        Settings that only place the work (PLACEMENT_SETTINGS) are left out, so a run resumed
        with more workers is the same run.
        """
        text = json.dumps(self.result_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _setting(dumped: dict[str, Any], key: str) -> tuple[Any, str | int]:
    """Return (container, last part) of the dotted `key` in a dumped config, so the value is container[part].

    Raises:
        ValueError: a part of `key` is not in the config; the message lists what is there.
    """
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    container: Any = dumped
    for depth, part in enumerate(parts):
        where = ".".join(str(p) for p in parts[:depth]) or "the config"
        if isinstance(container, list):
            if not isinstance(part, int) or part >= len(container):
                raise ValueError(f"tune.space: {key!r}: {where} is a list of {len(container)} items; use an index")
        elif not isinstance(container, dict) or part not in container:
            present = ", ".join(sorted(map(str, container))) if isinstance(container, dict) else "no keys"
            raise ValueError(f"tune.space: {key!r}: {where} has no {part!r}; it has {present}")
        if depth == len(parts) - 1:
            return container, part
        container = container[part]
    raise ValueError(f"tune.space: empty key {key!r}")


def with_settings(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """Return `config` with the dotted-key `values` set, validated again."""
    dumped = config.model_dump(mode="json")
    for key, value in values.items():
        container, part = _setting(dumped, key)
        container[part] = value
    try:
        return RunConfig.model_validate(dumped)
    except ValidationError as exc:
        raise ConfigError(f"settings {values}: {_describe_errors(exc, RunConfig)}") from None


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Return the field names of the sub-model at `loc`, for an unknown-key message."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _describe_errors(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            valid = _valid_keys(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {key!r}.{hint} Valid keys here: {', '.join(valid)}.")
        elif not loc:
            # Model-level checks (plugin names and parameters) name their own key.
            lines.append(str(error["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {error['msg']} (got {error.get('input')!r}).")
    return " ".join(lines)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, validate and resolve a YAML config.

    Relative paths inside the config are resolved against the config file's folder.

    Args:
        path: The YAML file.
        overrides: Top-level keys replaced after reading, e.g. {"seed": 3}.

    Raises:
        ConfigError: the file is missing or is not YAML, or a key is unknown or out of range.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist. Pass the path of a YAML run config.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, found {type(raw).__name__}.")
    raw.update(overrides or {})
    return config_from_dict(raw, base_dir=path.resolve().parent, source=str(path))


def config_from_dict(raw: dict[str, Any], *, base_dir: Path, source: str = "config") -> RunConfig:
    """Validate a config mapping and make its paths absolute against `base_dir`."""
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe_errors(exc, RunConfig)}") from None
    config.data.manifest = (base_dir / config.data.manifest).resolve()
    if config.data.root is not None:
        config.data.root = (base_dir / config.data.root).resolve()
    if config.teacher.checkpoint is not None:
        config.teacher.checkpoint = (base_dir / config.teacher.checkpoint).resolve()
    for extra in config.distill.extra_teachers:
        extra.checkpoint = (base_dir / extra.checkpoint).resolve()
    if config.feature_store is not None:
        config.feature_store = (base_dir / config.feature_store).resolve()
    if config.promotion.registry is not None:
        config.promotion.registry = (base_dir / config.promotion.registry).resolve()
    # A pretrained name is a folder when one exists there, else a hub id.
    config.data.text.tokenizer = _local_or_hub(config.data.text.tokenizer, base_dir)
    for model in (config.teacher, config.student):
        model.text_encoder.pretrained = _local_or_hub(model.text_encoder.pretrained, base_dir)
        for encoder in (model.image_encoder, model.audio_encoder):
            if encoder.pretrained is not None and ":" not in encoder.pretrained:
                encoder.pretrained = _local_or_hub(encoder.pretrained, base_dir)
        image = model.image_encoder
        if image.weights not in (None, "default"):
            image.weights = str((base_dir / Path(image.weights).expanduser()).resolve())
    return config


def _local_or_hub(name: str | None, base_dir: Path) -> str | None:
    """Return `name` as an absolute folder path when it names an existing folder, else unchanged."""
    if name is None:
        return None
    candidate = (base_dir / Path(name).expanduser())
    return str(candidate.resolve()) if candidate.is_dir() else name


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (paths absolute), atomically."""
    from mmkd.runs import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
