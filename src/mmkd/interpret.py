"""Views into a teacher and its student: layer similarity, embedding maps, modality use, calibration.

Every function takes tensors or a model and returns plain numbers or arrays, so the run
report, TensorBoard and tests all read the same computations:

- `linear_cka` and `cka_matrix`: linear centred kernel alignment (Kornblith et al.,
  "Similarity of Neural Network Representations Revisited", ICML 2019) between layers.
- `pca_2d` and `tsne_2d`: 2-D maps of embeddings.
- `modality_contributions`: what masking each modality does to a model's predictions.
- `fusion_attention`: the attention between modalities of attention-based fusion.
- `calibration` and `disagreements`: confidence against accuracy, and where two models differ most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmkd.errors import ConfigError

# Names of the block lists inside encoders whose items are compared layer by layer:
# mmkd's own encoders ("stages"), and transformers' BERT-style ("layer") and others' ("layers", "blocks").
BLOCK_LISTS = ("stages", "layer", "layers", "blocks")


def average_positions(output: torch.Tensor | tuple) -> torch.Tensor:
    """Reduce a layer's output to (rows, width).

    4-D outputs (convolution maps) are averaged over their last two axes, 3-D outputs
    (token or frame sequences) over their second axis; 2-D outputs are kept. A tuple, as
    transformers blocks return, gives its first element.
    """
    x = output[0] if isinstance(output, tuple) else output
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x


def capture_layers(model: nn.Module, names: list[str], *, setting: str, owner: str = "the model",
                   key: str = "layer-{}") -> tuple[dict[str, torch.Tensor], list]:
    """Hook the modules `names` of `model`; return the dict each forward pass fills, and the hook handles.

    Each output is stored averaged over its positions (see `average_positions`) under
    `key.format(name)`. Remove the handles to stop capturing.

    Raises:
        ConfigError: a module does not exist; the message names `setting` and `owner`, and lists its modules.
    """
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        if name not in modules:
            known = [n for n in modules if n and n.count(".") <= 3]
            raise ConfigError(f"{setting}: {owner} has no module {name!r}; some of its modules: {', '.join(known[:40])}")

        output = key.format(name)

        def keep(_module, _inputs, result, output=output) -> None:
            captured[output] = average_positions(result)

        handles.append(modules[name].register_forward_hook(keep))
    return captured, handles


def comparable_layers(model: nn.Module) -> list[str]:
    """Return the modules of a multimodal model worth comparing with another's, input to output.

    For each modality: every block of its encoder's block lists (BLOCK_LISTS), then the
    encoder itself (the modality embedding). Then the fusion (the fused embedding).
    """
    names = []
    for modality in getattr(model, "modalities", []):
        prefix = f"encoders.{modality}"
        for name, module in model.named_modules():
            is_list = isinstance(module, nn.ModuleList | nn.Sequential)
            if name.startswith(prefix + ".") and name.rsplit(".", 1)[-1] in BLOCK_LISTS and is_list:
                names += [f"{name}.{index}" for index in range(len(module))]
        names.append(prefix)
    return [*names, "fusion"]


@torch.no_grad()
def layer_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], *,
                  batch_rows: int = 256) -> dict[str, torch.Tensor]:
    """Run `model` in eval mode on `inputs` and return each module's output averaged over positions, as float64."""
    captured, handles = capture_layers(model, names, setting="report layers", key="{}")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    model.eval()
    try:
        for start in range(0, len(inputs[0]), batch_rows):
            model(*(x[start : start + batch_rows] for x in inputs))
            for name in names:
                parts[name].append(captured[name].double().flatten(1))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the linear CKA of two representations of the same rows, (rows, p) and (rows, q).

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with Xc, Yc the column-centred
    representations. It is 1 for representations that differ by an orthogonal transform
    and a scale, and does not depend on the widths. A representation without variance
    gives 0.
    """
    if len(x) != len(y):
        raise ValueError(f"CKA compares the same rows, but got {len(x)} and {len(y)}")
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norms) if norms > 0 else 0.0


def cka_matrix(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> np.ndarray:
    """Return linear CKA between every layer of `first` (rows) and of `second` (columns)."""
    return np.array([[linear_cka(a, b) for b in second.values()] for a in first.values()])


@dataclass(frozen=True)
class Map2d:
    """A 2-D map of embeddings: one point per row, and how the map was made."""

    points: np.ndarray
    method: str
    explained: tuple[float, float] | None = None


def pca_2d(x: torch.Tensor) -> Map2d:
    """Project rows onto their first two principal components.

    Each component's sign is fixed so that its largest loading is positive, so the same
    data always gives the same picture. `explained` is each component's share of the variance.
    """
    x = x.double().flatten(1)
    centred = x - x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.sign(largest)
    points = (centred @ components.T).numpy()
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    variance = singular**2
    shares = (variance / variance.sum()).tolist() if variance.sum() > 0 else [0.0, 0.0]
    shares += [0.0] * (2 - len(shares))
    return Map2d(points, "PCA", (shares[0], shares[1]))


def tsne_2d(x: torch.Tensor, *, seed: int = 0, perplexity: float = 30.0) -> Map2d:
    """Map rows to 2-D with scikit-learn's t-SNE, started from PCA and seeded, so a run repeats.

    The perplexity is lowered to (rows - 1) / 3 for small inputs, which t-SNE needs.
    """
    from sklearn.manifold import TSNE

    x = x.double().flatten(1).numpy()
    rows = len(x)
    if rows < 4:
        raise ValueError(f"t-SNE needs at least 4 rows, got {rows}")
    perplexity = min(perplexity, (rows - 1) / 3)
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return Map2d(np.asarray(points), f"t-SNE (perplexity {perplexity:g})")


@torch.no_grad()
def probabilities(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, batch_rows: int = 256) -> torch.Tensor:
    """Return the softmax of `model`'s logits on `inputs` (the last input is the modality mask), in eval mode."""
    model.eval()
    parts = [torch.softmax(model(*(x[start : start + batch_rows] for x in inputs))[0].double(), dim=1)
             for start in range(0, len(inputs[0]), batch_rows)]
    return torch.cat(parts)


def without_modality(inputs: tuple[torch.Tensor, ...], modalities: list[str], modality: str) -> tuple[torch.Tensor, ...]:
    """Return `inputs` with `modality` marked missing in every row's mask (the last input)."""
    mask = inputs[-1].clone()
    mask[:, modalities.index(modality)] = False
    return (*inputs[:-1], mask)


def modality_contributions(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> list[dict]:
    """Measure each modality's part in `model`'s predictions by masking it in every row.

    For each modality: accuracy with every modality and without it, the accuracy drop,
    the share of rows whose predicted class changes, and the mean total variation distance
    between the two predicted distributions (0: masking changes nothing, 1: disjoint).
    Rows that lack the modality already count as unchanged.
    """
    modalities = list(model.modalities)
    full = probabilities(model, inputs)
    accuracy = float((full.argmax(1) == labels).double().mean())
    results = []
    for modality in modalities:
        masked = probabilities(model, without_modality(inputs, modalities, modality))
        masked_accuracy = float((masked.argmax(1) == labels).double().mean())
        results.append({
            "modality": modality,
            "accuracy": accuracy,
            "accuracy_without": masked_accuracy,
            "accuracy_drop": accuracy - masked_accuracy,
            "changed_predictions": float((masked.argmax(1) != full.argmax(1)).double().mean()),
            "total_variation": float(0.5 * (masked - full).abs().sum(dim=1).mean()),
        })
    return results


@torch.no_grad()
def fusion_attention(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
                     classes: list[str]) -> dict | None:
    """Return the fusion's attention between modalities, averaged over rows, or None when it has none.

    Reads the `attention_weights` that attention-based fusion keeps after each forward,
    (rows, heads, M, M) with queries on the third axis. Returns "overall" (heads, M, M)
    averaged over every row, and "by_class" {class: (M, M)} averaged over heads and the
    rows of that class.
    """
    if not hasattr(model.fusion, "attention_weights"):
        return None
    model.eval()
    weights = []
    for start in range(0, len(inputs[0]), 256):
        model(*(x[start : start + 256] for x in inputs))
        weights.append(model.fusion.attention_weights.double())
    weights = torch.cat(weights)
    by_class = {name: weights[labels == index].mean(dim=(0, 1)).numpy()
                for index, name in enumerate(classes) if bool((labels == index).any())}
    return {"modalities": list(model.modalities), "overall": weights.mean(dim=0).numpy(), "by_class": by_class}


def calibration(probs: torch.Tensor, labels: torch.Tensor, *, bins: int = 15) -> dict:
    """Return the expected calibration error and the reliability diagram's bins.

    Rows are put in `bins` equal-width bins of their top probability (the last bin
    includes 1). ECE is the mean over rows of |bin accuracy - bin confidence|, each bin
    weighted by its share of the rows (Guo et al., "On Calibration of Modern Neural
    Networks", ICML 2017). Empty bins have accuracy and confidence None.
    """
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        accuracy = float(correct[inside].mean()) if count else None
        mean_confidence = float(confidence[inside].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(accuracy - mean_confidence)
        table.append({"low": b / bins, "high": (b + 1) / bins, "rows": count, "accuracy": accuracy,
                      "confidence": mean_confidence})
    return {"ece": ece, "bins": table}


def disagreements(teacher_probs: torch.Tensor, student_probs: torch.Tensor, *, count: int = 8) -> list[dict]:
    """Return the `count` rows where student and teacher disagree most, most first.

    Rows are ranked by the total variation distance between the two predicted
    distributions; ties keep row order. Each entry has the row's position, the distance
    and both predicted classes.
    """
    distance = 0.5 * (teacher_probs.double() - student_probs.double()).abs().sum(dim=1)
    order = sorted(range(len(distance)), key=lambda row: -float(distance[row]))[:count]
    return [{"row": row, "total_variation": float(distance[row]), "teacher": int(teacher_probs[row].argmax()),
             "student": int(student_probs[row].argmax())} for row in order]


def agreement(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> float:
    """Return the share of rows where teacher and student predict the same class."""
    return float((teacher_probs.argmax(1) == student_probs.argmax(1)).double().mean())
