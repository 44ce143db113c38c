"""The training loop's controls: schedules, clipping, weight averaging, the monitored metric, devices and precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mmkd.config import AudioConfig, ImageConfig, ModelConfig, TrainConfig
from mmkd.data.loading import TensorDataset
from mmkd.models.multimodal import MultimodalClassifier
from mmkd.training import Runtime, cross_entropy_loss, fit, resolve_device, resolve_precision


def image_rows(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        inputs={"image": torch.randn(count, 1, 28, 28, generator=generator)},
        mask=torch.ones(count, 1, dtype=torch.bool), labels=torch.arange(count) % 3,
        ids=[str(i) for i in range(count)], splits=["train"] * count, keys=[str(i) for i in range(count)],
        classes=["a", "b", "c"], modalities=["image"],
    )


def small_model(dropout: float = 0.0) -> MultimodalClassifier:
    torch.manual_seed(0)
    return MultimodalClassifier(ModelConfig(image_encoder={"width": 4, "blocks": [1]}, embed_dim=8, dropout=dropout),
                                modalities=["image"], num_classes=3, image=ImageConfig(), audio=AudioConfig())


def run(config: TrainConfig, *, runtime: Runtime | None = None, model=None, train_rows: int = 64):
    model = model or small_model()
    result = fit(model, image_rows(train_rows, 1), image_rows(24, 2), config, cross_entropy_loss, stage="test",
                 seed=0, runtime=runtime or Runtime())
    return model, result


class StepRecorder:
    """Records, around each optimiser step, the learning rate, the gradients' norm and the weights after."""

    def __init__(self):
        self.rates, self.norms, self.weights = [], [], []

    def __enter__(self):
        def before(optimizer, args, kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            self.rates.append(optimizer.param_groups[0]["lr"])

        def after(optimizer, args, kwargs):
            self.weights.append([p.detach().clone() for p in optimizer.param_groups[0]["params"]])

        self.handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_cosine_schedule_rates():
    # 64 rows in batches of 8 give 8 steps per epoch and 40 in 5 epochs. A 10% warm-up is 4 steps.
    config = TrainConfig(epochs=5, batch_size=8, lr=0.01, patience=5, schedule="cosine", warmup_fraction=0.1)
    with StepRecorder() as steps:
        run(config)
    warmup, total = 4, 40
    expected = [0.01 * (1 / 5 + (1 - 1 / 5) * t / warmup) for t in range(warmup)]
    expected += [0.5 * 0.01 * (1 + math.cos(math.pi * t / (total - warmup))) for t in range(total - warmup)]
    assert steps.rates == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_constant_schedule_rates():
    with StepRecorder() as steps:
        run(TrainConfig(epochs=2, batch_size=16, lr=0.003, patience=2, schedule="constant"))
    assert steps.rates == pytest.approx([0.003] * 8)


def test_gradient_clipping_norm():
    with StepRecorder() as unclipped:
        run(TrainConfig(epochs=1, batch_size=8, lr=0.01, patience=1))
    assert max(unclipped.norms) > 0.05  # the clip below bites
    with StepRecorder() as clipped:
        run(TrainConfig(epochs=1, batch_size=8, lr=0.01, patience=1, grad_clip_norm=0.05))
    assert max(clipped.norms) == pytest.approx(0.05, rel=1e-4)
    assert all(norm <= 0.05 * (1 + 1e-4) for norm in clipped.norms)


def test_weight_average_is_exponential():
    decay = 0.8
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, patience=1, ema_decay=decay)
    model = small_model()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    with StepRecorder() as steps:
        run(config, model=model)
    # The average starts at the first step's weights, then moves by (1 - decay) towards each later step's.
    average = steps.weights[0]
    for weights in steps.weights[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights, strict=True)]
    final = dict(model.named_parameters())
    for name, expected in zip(names, average, strict=True):
        assert torch.allclose(final[name], expected, atol=1e-6), name
    assert not torch.allclose(final[names[0]], steps.weights[-1][0])


@pytest.mark.parametrize(("monitor", "pick"), [("val_accuracy", max), ("val_macro_f1", max), ("val_loss", min)])
def test_best_epoch_by_monitor(monitor, pick):
    _, result = run(TrainConfig(epochs=6, batch_size=8, lr=0.02, patience=6, monitor=monitor))
    values = [record[monitor] for record in result.history]
    assert result.best_epoch == values.index(pick(values)) + 1
    assert result.best_value == pick(values)
    assert result.best_val_accuracy == result.history[result.best_epoch - 1]["val_accuracy"]


def test_patience_counts_stale_epochs():
    _, result = run(TrainConfig(epochs=50, batch_size=64, lr=1e-9, patience=3, monitor="val_loss"))
    losses = [record["val_loss"] for record in result.history]
    best_at = losses.index(min(losses))
    assert len(losses) == best_at + 1 + 3
    assert result.epochs_run < 50


def test_auto_device_without_gpu():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="no MPS device"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="fp16 needs a GPU.*bf16 or fp32"):
        resolve_precision("fp16", torch.device("cpu"))


def test_bf16_forward_pass():
    model = small_model()
    seen = []
    model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype) if module.training else None)
    _, result = run(TrainConfig(epochs=1, batch_size=16, lr=0.01, patience=1), runtime=Runtime(precision="bf16"),
                    model=model)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(result.history[0]["loss"])


def test_channels_last_training():
    plain, plain_result = run(TrainConfig(epochs=2, batch_size=16, lr=0.01, patience=2))
    model, result = run(TrainConfig(epochs=2, batch_size=16, lr=0.01, patience=2), runtime=Runtime(channels_last=True))
    convolutions = [p for p in model.parameters() if p.dim() == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert [r["loss"] for r in result.history] == pytest.approx([r["loss"] for r in plain_result.history], rel=1e-4)


def test_compiled_training_matches_eager():
    config = TrainConfig(epochs=1, batch_size=32, lr=0.01, patience=1)
    _, eager = run(config)
    _, compiled = run(config, runtime=Runtime(compile=True))
    assert compiled.history[0]["loss"] == pytest.approx(eager.history[0]["loss"], rel=1e-4)
    assert compiled.history[0]["val_accuracy"] == eager.history[0]["val_accuracy"]
