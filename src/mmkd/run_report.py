"""The run report: one page showing what the student learned from its teacher, and where it did not.

`build_report(run_dir)` reads a finished run folder (config, checkpoints, metrics.json,
benchmark.json, validation) and computes every section without training anything.
`write_report` saves it as `report/report.html`, a single file with its PNG figures
embedded, `report/report.md`, the figures as PNG files and `report/report.json`
with the numbers behind them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmkd import interpret
from mmkd.reports import latency_series, metrics_rows

MODELS = ("teacher", "student", "baseline")
COLOURS = {"teacher": "#1f77b4", "student": "#ff7f0e", "baseline": "#7f7f7f"}


@dataclass
class Figure:
    """One PNG figure of the report."""

    name: str
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Table:
    """A table of the report: column names, rows of cell text, and a line shown above it."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    """One section of the report: paragraphs, then tables, then figures."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    """A built report: its sections and the numbers they show."""

    title: str
    run_dir: Path
    sections: list[Section]
    numbers: dict
    # The fused embeddings of the mapped test rows, by model, and those rows' class names.
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    embedding_labels: list[str] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        return [figure for section in self.sections for figure in section.figures]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


@dataclass
class _RunInputs:
    """Inputs of a report, read from a run folder."""

    run_dir: Path
    config: object
    dataset: object
    test: object
    models: dict
    metadata: dict
    metrics: dict | None
    benchmark: list[dict]
    validation: dict | None
    embeddings: dict = field(default_factory=dict)
    embedding_labels: list = field(default_factory=list)


def _load_run(run_dir: Path) -> _RunInputs:
    from mmkd.checkpoints import load_checkpoint
    from mmkd.config import load_config
    from mmkd.data.loading import decode_to_cache, load_decoded
    from mmkd.errors import ConfigError

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: it has no config.yaml. Give the folder that `mmkd run` "
                          "printed, such as runs/<time>-<name>-seed0")
    config = load_config(config_path)
    dataset = load_decoded(decode_to_cache(config.data, run_dir.parent / "cache"))
    files = {"teacher": run_dir / "teacher.pt", "student": run_dir / "student.pt", "baseline": run_dir / "baseline.pt"}
    if not files["teacher"].is_file() or not files["student"].is_file():
        raise ConfigError(f"{run_dir} has no teacher.pt or student.pt: the report needs a run that finished its "
                          "finetune stage; run `mmkd run` to the end first")
    models, metadata = {}, {}
    for role, path in files.items():
        if path.is_file():
            models[role], metadata[role] = load_checkpoint(path, config)

    def read(name: str):
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    return _RunInputs(run_dir, config, dataset, dataset.subset("test"), models, metadata, read("metrics.json"),
                      read("benchmark.json") or [], read("validation/validation.json"))


def build_report(run_dir: Path, *, map_rows: int = 1000, examples: int = 8, seed: int | None = None) -> Report:
    """Compute every section of the report of the run in `run_dir`; nothing is trained.

    Args:
        run_dir: A run folder that finished at least its finetune stage.
        map_rows: At most this many test rows go into the embedding maps and the CKA.
        examples: How many of the rows where student and teacher disagree most are shown.
        seed: Seed of the t-SNE maps and of the choice of rows when there are more than `map_rows`;
            by default the run's seed.

    Raises:
        ConfigError: the folder is not a run folder, or lacks the teacher or the student.
    """
    # A link such as runs/latest is followed, so the report names the run folder itself.
    run = _load_run(Path(run_dir).resolve())
    seed = run.config.seed if seed is None else seed
    test = run.test
    numbers: dict = {"run_dir": str(run.run_dir), "test_rows": len(test)}
    outputs = {}
    for role, model in run.models.items():
        inputs = test.with_modalities(model.modalities).model_inputs()
        probs = interpret.probabilities(model, inputs)
        outputs[role] = {"inputs": inputs, "probs": probs}

    sections = [
        _data_section(run, numbers),
        _training_section(run, numbers),
        _metrics_section(run, outputs, numbers),
        _calibration_section(run, outputs, numbers),
        _agreement_section(run, outputs, numbers, examples),
        _size_section(run, numbers),
        _embedding_section(run, numbers, map_rows, seed),
        _modality_section(run, outputs, numbers),
    ]
    attention = _attention_section(run, outputs, numbers)
    if attention is not None:
        sections.append(attention)
    title = f"Run report: {run.config.name}, seed {run.config.seed}"
    report = Report(title, run.run_dir, sections, numbers)
    report.embeddings, report.embedding_labels = run.embeddings, run.embedding_labels
    return report


def _data_section(run: _RunInputs, numbers: dict) -> Section:
    section = Section("Data")
    validation = run.validation
    if validation is not None:
        section.paragraphs.append(
            f"Validation {'passed' if validation['passed'] else 'failed'}: {validation['message']}. "
            f"{validation['rows_in']} rows read, {validation['rows_kept']} kept, "
            f"{validation['rows_quarantined']} set aside; {validation['critical_failures']} critical and "
            f"{validation['warning_failures']} warning expectations failed out of {len(validation['checks'])}."
        )
        numbers["validation"] = {k: validation[k] for k in ("passed", "rows_in", "rows_kept", "rows_quarantined")}
    else:
        section.paragraphs.append("This run has no validation report.")
    dataset = run.dataset
    splits = ["train", "val", "test"]
    counts = {name: {split: 0 for split in splits} for name in dataset.classes}
    for label, split in zip(dataset.labels.tolist(), dataset.splits, strict=True):
        counts[dataset.classes[label]][split] += 1
    rows = [[name, *(str(counts[name][s]) for s in splits), str(sum(counts[name].values()))] for name in dataset.classes]
    rows.append(["all", *(str(sum(counts[n][s] for n in counts)) for s in splits), str(len(dataset))])
    section.tables.append(Table(["class", *splits, "rows"], rows))
    numbers["class_split_counts"] = counts
    return section


def _stage_histories(run: _RunInputs) -> dict[str, list[dict]]:
    """Per-epoch records of each training stage, from the checkpoints' metadata."""
    teacher = (run.metadata["teacher"].get("training") or {})
    student = (run.metadata["student"].get("training") or {})
    baseline = (run.metadata.get("baseline", {}).get("training") or {})
    stages = {"teacher": teacher, "distill": student.get("distill") or {}, "finetune": student.get("finetune") or {},
              "baseline": baseline}
    return {stage: training.get("history") or [] for stage, training in stages.items()}


def _training_section(run: _RunInputs, numbers: dict) -> Section:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    section = Section("Training")
    histories = _stage_histories(run)
    numbers["history"] = histories
    missing = [stage for stage, history in histories.items() if not history]
    if missing:
        section.paragraphs.append(f"No per-epoch records for {', '.join(missing)}: the stage was skipped, or its "
                                  "checkpoint was written by an mmkd that did not keep them.")
    for stage, history in histories.items():
        if not history:
            continue
        epochs = [record["epoch"] for record in history]
        losses = [k for k in history[0] if k not in {"epoch", "seconds"} and not k.startswith("val_")]
        scores = [k for k in ("val_accuracy", "val_macro_f1") if k in history[0]]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        for name in losses:
            left.plot(epochs, [record[name] for record in history], marker="o", markersize=3, label=name)
        if "val_loss" in history[0]:
            left.plot(epochs, [record["val_loss"] for record in history], linestyle="--", label="val_loss")
        left.set(xlabel="epoch", ylabel="loss", title=f"{stage}: training loss terms")
        left.legend(fontsize=8)
        for name in scores:
            right.plot(epochs, [record[name] for record in history], marker="o", markersize=3, label=name)
        right.set(xlabel="epoch", ylabel="score", title=f"{stage}: validation", ylim=(0, 1.02))
        right.legend(fontsize=8)
        for axis in (left, right):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        section.figures.append(Figure(f"curves-{stage}", f"{stage} training curves", _png(figure),
                                      "Each loss term is the mean over the epoch's training rows."))
    return section


def _metrics_section(run: _RunInputs, outputs: dict, numbers: dict) -> Section:
    from mmkd.training import classification_metrics

    plt = _pyplot()
    section = Section("Metrics")
    if run.metrics is not None:
        rows = metrics_rows(run.metrics, run.benchmark)
        section.tables.append(Table(
            ["model", "engine", "parameters", "test accuracy", "macro-F1", "p50 ms, batch 1"],
            [[r["model"], r["engine"], f"{r['parameters']:,}", _number(r["test_accuracy"]), _number(r["macro_f1"]),
              _number(r["p50_ms_batch1"], 3)] for r in rows],
        ))
        numbers["metrics_table"] = rows
    else:
        section.paragraphs.append("This run has no metrics.json: its evaluate stage did not run.")
    seeds = _seed_metrics(run)
    if len(seeds) > 1:
        section.tables.append(Table(
            ["model", "test accuracy", "macro-F1"],
            [[label, _spread([m[key]["test"]["accuracy"] for m in seeds.values()]),
              _spread([m[key]["test"]["macro_f1"] for m in seeds.values()])] for key, label in COMPARED],
            caption=f"Over the {len(seeds)} seeds of this config and data finished in the same output folder "
                    f"({', '.join(map(str, sorted(seeds)))}), mean ± standard deviation:",
        ))
        numbers["seeds"] = {str(seed): {key: metrics[key]["test"]["accuracy"] for key, _ in COMPARED}
                            for seed, metrics in seeds.items()}
    classes = run.dataset.classes
    labels = run.test.labels
    scores = {role: classification_metrics(output["probs"].float(), labels, classes) for role, output in outputs.items()}
    numbers["per_class"] = {role: score["per_class"] for role, score in scores.items()}
    section.tables.append(Table(
        ["class", *(f"{role} {metric}" for role in scores for metric in ("precision", "recall", "F1"))],
        [[name, *(_number(scores[role]["per_class"][name][metric], 3) for role in scores
                  for metric in ("precision", "recall", "f1"))] for name in classes],
    ))
    figure, axes = plt.subplots(1, len(outputs), figsize=(4.2 * len(outputs), 4))
    for axis, (role, output) in zip(np.atleast_1d(axes), outputs.items(), strict=True):
        matrix = np.zeros((len(classes), len(classes)), dtype=int)
        for true, predicted in zip(labels.tolist(), output["probs"].argmax(1).tolist(), strict=True):
            matrix[true, predicted] += 1
        numbers.setdefault("confusion", {})[role] = matrix.tolist()
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                if matrix[i, j]:
                    axis.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                              color="white" if shares[i, j] > 0.5 else "black")
        axis.set(title=f"{role} (accuracy {scores[role]['accuracy']:.3f})", xlabel="predicted", ylabel="true",
                 xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes)
    section.figures.append(Figure("confusion", "Confusion matrices on the test split", _png(figure),
                                  "Rows are the true classes; the shading is each row's share, the numbers are rows."))
    return section


def _seed_metrics(run: _RunInputs) -> dict[int, dict]:
    """Return metrics.json of the newest finished run of each seed of this run's config and data, beside this run.

    A run counts when it read data with the same fingerprint, and its config equals this
    run's once the seed and the manifest path are set alike: validation points each run's
    config at the clean manifest in its own folder.
    """
    from mmkd.config import load_config

    if run.metrics is None:
        return {}

    def settings(config) -> str:
        data = config.data.model_copy(update={"manifest": Path("manifest")})
        return config.model_copy(update={"seed": 0, "data": data}).fingerprint()

    ours, data = settings(run.config), run.metrics["run"]["data_fingerprint"]
    found: dict[int, dict] = {}
    # Run folders start with their UTC start time, so in name order a later run of a seed replaces an earlier one.
    for path in sorted(run.run_dir.parent.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        try:
            other = load_config(path.parent / "config.yaml")
        except (OSError, ValueError):
            continue
        if metrics["run"].get("data_fingerprint") == data and settings(other) == ours:
            found[other.seed] = metrics
    return found


def _calibration_section(run: _RunInputs, outputs: dict, numbers: dict) -> Section:
    plt = _pyplot()
    section = Section("Calibration")
    results = {role: interpret.calibration(output["probs"], run.test.labels) for role, output in outputs.items()}
    numbers["calibration"] = results
    section.tables.append(Table(["model", "expected calibration error (15 bins)"],
                                [[role, _number(result["ece"])] for role, result in results.items()]))
    figure, axis = plt.subplots(figsize=(5, 4.5))
    axis.plot([0, 1], [0, 1], color="#bbb", linestyle="--", label="perfect calibration")
    for role, result in results.items():
        filled = [b for b in result["bins"] if b["rows"]]
        axis.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o",
                  color=COLOURS.get(role), label=f"{role} (ECE {result['ece']:.3f})")
    axis.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
             title="Reliability diagram, test split")
    axis.legend(fontsize=8)
    section.figures.append(Figure("reliability", "Reliability diagram", _png(figure),
                                  "Each point is one confidence bin with rows: its mean confidence and its accuracy."))
    return section


def _agreement_section(run: _RunInputs, outputs: dict, numbers: dict, examples: int) -> Section:
    section = Section("Teacher and student agreement")
    teacher, student = outputs["teacher"]["probs"], outputs["student"]["probs"]
    overall = interpret.agreement(teacher, student)
    labels = run.test.labels
    classes = run.dataset.classes
    by_class = {name: interpret.agreement(teacher[labels == i], student[labels == i])
                for i, name in enumerate(classes) if bool((labels == i).any())}
    numbers["agreement"] = {"overall": overall, "by_class": by_class}
    section.paragraphs.append(f"The student predicts the teacher's class on {overall:.1%} of the {len(labels)} test rows.")
    section.tables.append(Table(["class", "agreement"], [[name, _number(value, 3)] for name, value in by_class.items()]))
    worst = interpret.disagreements(teacher, student, count=min(examples, len(labels)))
    texts = _texts(run) if "text" in run.test.modalities else None
    numbers["disagreements"] = [
        {**entry, "id": run.test.ids[entry["row"]], "label": classes[int(labels[entry["row"]])],
         **({"text": texts[entry["row"]]} if texts is not None else {})}
        for entry in worst
    ]
    if worst:
        section.figures.append(Figure("disagreements", "Where the student and the teacher disagree most",
                                      _disagreement_png(run, worst, texts),
                                      "Ranked by the total variation distance between the two predicted distributions."))
    return section


def _spectrogram(waveform: torch.Tensor) -> np.ndarray:
    """Log-magnitude short-time Fourier transform of a waveform, frequencies by frames."""
    spectrum = torch.stft(waveform.float(), n_fft=256, hop_length=64, window=torch.hann_window(256), return_complex=True)
    return torch.log1p(spectrum.abs()).numpy()


def _disagreement_png(run: _RunInputs, worst: list[dict], texts: list[str] | None) -> bytes:
    plt = _pyplot()
    test, classes = run.test, run.dataset.classes
    modalities = [m for m in test.modalities if m in ("image", "audio", "text")]
    figure, axes = plt.subplots(len(modalities), len(worst), figsize=(2.1 * len(worst), 2.1 * len(modalities)),
                                squeeze=False)
    for column, entry in enumerate(worst):
        row = entry["row"]
        for line, modality in enumerate(modalities):
            axis = axes[line, column]
            axis.set_xticks([])
            axis.set_yticks([])
            present = bool(test.mask[row, test.modalities.index(modality)])
            if not present:
                axis.text(0.5, 0.5, f"no {modality}", ha="center", va="center")
            elif modality == "image":
                image = test.inputs["image"][row].float()
                image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
                axis.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
            elif modality == "audio":
                axis.imshow(_spectrogram(test.inputs["audio"][row]), origin="lower", aspect="auto", cmap="magma")
            else:
                axis.text(0.02, 0.5, _wrap(texts[row], 22), va="center", fontsize=7)
            if line == 0:
                axis.set_title(f"{test.ids[row]}\ntrue {classes[int(test.labels[row])]}, teacher "
                               f"{classes[entry['teacher']]}, student {classes[entry['student']]}", fontsize=7)
        for line, modality in enumerate(modalities):
            axes[line, 0].set_ylabel("spectrogram" if modality == "audio" else modality)
    return _png(figure)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:8])


def _texts(run: _RunInputs) -> list[str]:
    """Decode the test rows' texts back from their token ids."""
    from mmkd.models.text import load_tokenizer

    tokenizer = load_tokenizer(run.config.data.text.tokenizer, allow_downloads=False)
    ids, mask = run.test.inputs["input_ids"], run.test.inputs["attention_mask"]
    return [tokenizer.decode(ids[row][mask[row].bool()].tolist(), skip_special_tokens=True) for row in range(len(ids))]


def _size_section(run: _RunInputs, numbers: dict) -> Section:
    plt = _pyplot()
    section = Section("Size and latency")
    rows = []
    for role in MODELS:
        if role in run.metadata:
            rows.append([role, "PyTorch checkpoint", f"{run.metadata[role]['params']:,}",
                         f"{(run.run_dir / f'{role}.pt').stat().st_size / 2**20:.2f}"])
    for name in ("student.onnx", "teacher.onnx"):
        if (run.run_dir / name).is_file():
            rows.append([name.split(".")[0], "ONNX", "-", f"{(run.run_dir / name).stat().st_size / 2**20:.2f}"])
    section.tables.append(Table(["model", "format", "parameters", "file MiB"], rows))
    numbers["sizes"] = rows
    if not run.benchmark:
        section.paragraphs.append("This run has no benchmark.json: its benchmark stage did not run.")
        return section
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, points in sorted(latency_series(run.benchmark).items()):
        points = sorted(points)
        axis.plot([b for b, _ in points], [ms for _, ms in points], marker="o", label=name)
    batches = sorted({row["batch_size"] for row in run.benchmark})
    axis.set_xscale("log", base=2)
    axis.set(yscale="log", xticks=batches, xticklabels=[str(b) for b in batches], xlabel="batch size",
             ylabel="p50 latency, ms", title="Latency by batch size")
    axis.legend(fontsize=8)
    provider = sorted({row["provider"] for row in run.benchmark if row["engine"] == "onnxruntime"})
    section.figures.append(Figure("latency", "Latency", _png(figure),
                                  f"Median latency per batch; ONNX Runtime ran on {', '.join(provider) or '-'}."))
    return section


def _map_rows(run: _RunInputs, map_rows: int, seed: int) -> list[int]:
    rows = list(range(len(run.test)))
    if len(rows) <= map_rows:
        return rows
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(len(rows), generator=generator)[:map_rows].tolist())


def _embedding_section(run: _RunInputs, numbers: dict, map_rows: int, seed: int) -> Section:
    plt = _pyplot()
    section = Section("Embeddings and layer similarity")
    rows = _map_rows(run, map_rows, seed)
    subset = run.test.take(rows)
    labels = subset.labels.numpy()
    classes = run.dataset.classes
    layers = {}
    for role in ("teacher", "student"):
        model = run.models[role]
        inputs = subset.with_modalities(model.modalities).model_inputs()
        layers[role] = interpret.layer_outputs(model, inputs, interpret.comparable_layers(model))
        run.embeddings[role] = layers[role]["fusion"].float().numpy()
    run.embedding_labels = [classes[label] for label in labels.tolist()]
    maps = {}
    for method, make in (("pca", interpret.pca_2d), ("tsne", lambda x: interpret.tsne_2d(x, seed=seed))):
        figure, axes = plt.subplots(1, 2, figsize=(10, 4.4))
        for axis, role in zip(axes, ("teacher", "student"), strict=True):
            projection = make(layers[role]["fusion"]) if len(rows) >= 4 else None
            if projection is None:
                axis.text(0.5, 0.5, "too few test rows", ha="center")
                continue
            maps.setdefault(method, {})[role] = projection
            scatter = axis.scatter(projection.points[:, 0], projection.points[:, 1], c=labels, cmap="tab10", s=8,
                                   vmin=0, vmax=max(len(classes) - 1, 1))
            share = f", {projection.explained[0]:.0%} + {projection.explained[1]:.0%} of the variance" if projection.explained else ""
            axis.set(title=f"{role}: {projection.method}{share}", xticks=[], yticks=[])
        if len(classes) <= 20 and len(rows) >= 4:
            handles = [plt.Line2D([], [], marker="o", linestyle="", color=scatter.cmap(scatter.norm(i)), label=name)
                       for i, name in enumerate(classes)]
            axes[1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
        name = "PCA" if method == "pca" else "t-SNE"
        section.figures.append(Figure(f"embeddings-{method}", f"{name} of the fused embeddings", _png(figure),
                                      f"{len(rows)} test rows, coloured by their true class."))
    numbers["maps"] = {method: {role: {"method": m.method, "explained": m.explained} for role, m in by_role.items()}
                       for method, by_role in maps.items()}

    matrix = interpret.cka_matrix(layers["teacher"], layers["student"])
    numbers["cka"] = {"teacher_layers": list(layers["teacher"]), "student_layers": list(layers["student"]),
                      "matrix": matrix.tolist()}
    figure, axis = plt.subplots(figsize=(1.6 + 0.45 * len(layers["student"]), 1.6 + 0.35 * len(layers["teacher"])))
    image = axis.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    axis.set(xticks=range(len(layers["student"])), yticks=range(len(layers["teacher"])),
             xticklabels=list(layers["student"]), yticklabels=list(layers["teacher"]),
             xlabel="student layer", ylabel="teacher layer", title="Linear CKA")
    axis.tick_params(axis="x", labelrotation=90, labelsize=7)
    axis.tick_params(axis="y", labelsize=7)
    figure.colorbar(image, ax=axis, fraction=0.04)
    section.figures.append(Figure("cka", "Linear CKA between teacher and student layers", _png(figure),
                                  "1: the two layers' representations of the test rows differ by a rotation and a "
                                  "scale; 0: unrelated."))
    return section


def _modality_section(run: _RunInputs, outputs: dict, numbers: dict) -> Section:
    plt = _pyplot()
    section = Section("What each modality contributes")
    section.paragraphs.append("Each modality is masked in every test row in turn, as if it were missing; the table "
                              "shows how the predictions change.")
    results = {role: interpret.modality_contributions(run.models[role], outputs[role]["inputs"], run.test.labels)
               for role in ("teacher", "student")}
    numbers["modality_contributions"] = results
    section.tables.append(Table(
        ["model", "modality masked", "accuracy", "accuracy without", "predictions changed", "total variation"],
        [[role, r["modality"], _number(r["accuracy"]), _number(r["accuracy_without"]),
          _number(r["changed_predictions"], 3), _number(r["total_variation"], 3)]
         for role, rows in results.items() for r in rows],
    ))
    modalities = sorted({r["modality"] for rows in results.values() for r in rows})
    figure, axis = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for offset, role in zip((-width / 2, width / 2), ("teacher", "student"), strict=True):
        drops = {r["modality"]: r["accuracy_drop"] for r in results[role]}
        axis.bar([i + offset for i in range(len(modalities))], [drops.get(m, 0.0) for m in modalities], width,
                 color=COLOURS[role], label=role)
    axis.set(xticks=range(len(modalities)), xticklabels=modalities, ylabel="accuracy drop when masked",
             title="Modality contributions, test split")
    axis.axhline(0, color="#888", linewidth=0.8)
    axis.legend(fontsize=8)
    section.figures.append(Figure("modalities", "Modality contributions", _png(figure),
                                  "A modality a model does not read has no bar."))
    return section


def _attention_section(run: _RunInputs, outputs: dict, numbers: dict) -> Section | None:
    plt = _pyplot()
    maps = {}
    for role in ("teacher", "student"):
        found = interpret.fusion_attention(run.models[role], outputs[role]["inputs"], run.test.labels,
                                           run.dataset.classes)
        if found is not None:
            maps[role] = found
    if not maps:
        return None
    section = Section("Attention between modalities")
    numbers["attention"] = {role: {"modalities": m["modalities"], "overall": m["overall"].tolist()}
                            for role, m in maps.items()}
    for role, found in maps.items():
        overall = found["overall"]
        heads = overall.shape[0]
        figure, axes = plt.subplots(1, heads, figsize=(2.8 * heads + 0.6, 2.9), squeeze=False)
        names = found["modalities"]
        for head in range(heads):
            axis = axes[0, head]
            axis.imshow(overall[head], cmap="Greens", vmin=0, vmax=1)
            for i in range(len(names)):
                for j in range(len(names)):
                    axis.text(j, i, f"{overall[head, i, j]:.2f}", ha="center", va="center", fontsize=8)
            axis.set(title=f"head {head + 1}", xticks=range(len(names)), yticks=range(len(names)),
                     xticklabels=names, yticklabels=names, xlabel="attends to", ylabel="query")
        section.figures.append(Figure(f"attention-{role}", f"{role}: fusion attention", _png(figure),
                                      "The last fusion block's attention weights, averaged over the test rows."))
    return section


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table.rows)
    caption = f"<p>{html.escape(table.caption)}</p>" if table.caption else ""
    return f"{caption}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
"""


def render_html(report: Report) -> str:
    """Return the report as one HTML page with every figure embedded as a base64 PNG."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(report.title)}</h1>",
             f"<p>Folder: <code>{html.escape(str(report.run_dir))}</code></p>"]
    for section in report.sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(text)}</p>" for text in section.paragraphs]
        parts += [_html_table(table) for table in section.tables]
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode()
            parts.append(f"<figure id='{figure.name}'><img alt='{html.escape(figure.title)}' "
                         f"src='data:image/png;base64,{data}'><figcaption>{html.escape(figure.title)}. "
                         f"{html.escape(figure.caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _markdown_table(table: Table) -> str:
    lines = [table.caption, ""] if table.caption else []
    lines += ["| " + " | ".join(table.columns) + " |", "| " + " | ".join("---" for _ in table.columns) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render_markdown(report: Report, *, figure_folder: str | None = "figures") -> str:
    """Return the report as markdown; figures are linked from `figure_folder`, or only named when it is None."""
    parts = [f"# {report.title}", "", f"Folder: `{report.run_dir}`", ""]
    for section in report.sections:
        parts += [f"## {section.title}", ""]
        for text in section.paragraphs:
            parts += [text, ""]
        for table in section.tables:
            parts += [_markdown_table(table), ""]
        for figure in section.figures:
            if figure_folder is None:
                parts += [f"Figure: {figure.title} (`report/figures/{figure.name}.png`). {figure.caption}".rstrip(), ""]
            else:
                parts += [f"![{figure.title}]({figure_folder}/{figure.name}.png)", ""]
                parts += [figure.caption, ""] if figure.caption else []
    return "\n".join(parts)


def write_report(report: Report, folder: Path | None = None) -> dict[str, Path]:
    """Write report.html, report.md, report.json and figures/*.png to `folder` (default: <run>/report)."""
    from mmkd.runs import atomic_write_json, atomic_write_text

    folder = Path(folder) if folder is not None else report.run_dir / "report"
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    for figure in report.figures:
        (folder / "figures" / f"{figure.name}.png").write_bytes(figure.png)
    paths = {"html": folder / "report.html", "markdown": folder / "report.md", "json": folder / "report.json"}
    atomic_write_text(paths["html"], render_html(report))
    atomic_write_text(paths["markdown"], render_markdown(report))
    atomic_write_json(paths["json"], report.numbers)
    return paths


COMPARED = (("teacher", "teacher"), ("student", "student"), ("baseline", "baseline"), ("onnx", "ONNX student"))


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} ± {sd:.4f}"


def compare_runs(run_dirs: list[Path]) -> Report:
    """Put finished runs side by side: test accuracies, agreement, calibration, size and latency.

    Runs of the same config name are also summarised together, as mean ± standard
    deviation over their seeds. Agreement and calibration come from each run's
    report/report.json, written by the run's report stage or `mmkd report`.

    Raises:
        ConfigError: a folder has no metrics.json.
    """
    from mmkd.errors import ConfigError
    from mmkd.reports import p50

    plt = _pyplot()
    runs = []
    run_dirs = [Path(run_dir).resolve() for run_dir in run_dirs]
    for run_dir in run_dirs:
        if not (run_dir / "metrics.json").is_file():
            raise ConfigError(f"{run_dir} has no metrics.json: compare takes run folders of finished runs")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        benchmark = json.loads((run_dir / "benchmark.json").read_text()) if (run_dir / "benchmark.json").is_file() else []
        numbers = (json.loads((run_dir / "report" / "report.json").read_text())
                   if (run_dir / "report" / "report.json").is_file() else {})
        runs.append({
            "folder": run_dir.name, "name": metrics["run"]["name"], "seed": metrics["run"]["seed"],
            **{f"{key}_accuracy": metrics[key]["test"]["accuracy"] for key, _ in COMPARED},
            "student_macro_f1": metrics["student"]["test"].get("macro_f1"),
            "agreement": numbers.get("agreement", {}).get("overall"),
            "student_ece": numbers.get("calibration", {}).get("student", {}).get("ece"),
            "student_params": metrics["student"]["params"],
            "onnx_p50_ms": p50(benchmark, "student", "onnxruntime", 1),
        })
    columns = ["run", "seed", *(f"{label} accuracy" for _, label in COMPARED), "student macro-F1",
               "agreement", "student ECE", "student parameters", "ONNX p50 ms, batch 1"]
    rows = [[r["folder"], str(r["seed"]), *(_number(r[f"{key}_accuracy"]) for key, _ in COMPARED),
             _number(r["student_macro_f1"]), _number(r["agreement"], 3), _number(r["student_ece"], 3),
             f"{r['student_params']:,}", _number(r["onnx_p50_ms"], 3)] for r in runs]
    section = Section("Runs side by side", tables=[Table(columns, rows)])

    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["name"], []).append(r)
    section.tables.append(Table(
        ["config", "seeds", *(f"{label} accuracy" for _, label in COMPARED)],
        [[name, str(len(members)), *(_spread([m[f"{key}_accuracy"] for m in members]) for key, _ in COMPARED)]
         for name, members in groups.items()],
    ))

    figure, axis = plt.subplots(figsize=(max(5.0, 1.3 * len(runs) + 2), 3.8))
    width = 0.8 / len(COMPARED)
    for index, (key, label) in enumerate(COMPARED):
        axis.bar([i - 0.4 + width * (index + 0.5) for i in range(len(runs))], [r[f"{key}_accuracy"] for r in runs],
                 width, label=label, color=COLOURS.get(key, "#2ca02c"))
    axis.set(xticks=range(len(runs)), ylabel="test accuracy", ylim=(0, 1.02), title="Test accuracy by run")
    axis.set_xticklabels([f"{r['name']}\nseed {r['seed']}" for r in runs], fontsize=8)
    axis.legend(fontsize=8, loc="lower right")
    section.figures.append(Figure("compare-accuracy", "Test accuracy by run", _png(figure)))
    return Report(f"Comparison of {len(runs)} runs", run_dirs[0].parent, [section], {"runs": runs})


def write_comparison(report: Report, folder: Path) -> dict[str, Path]:
    """Write a comparison from `compare_runs` as compare.html, compare.md and figures/*.png in `folder`."""
    from mmkd.runs import atomic_write_text

    (folder / "figures").mkdir(parents=True, exist_ok=True)
    for figure in report.figures:
        (folder / "figures" / f"{figure.name}.png").write_bytes(figure.png)
    paths = {"html": folder / "compare.html", "markdown": folder / "compare.md"}
    atomic_write_text(paths["html"], render_html(report))
    atomic_write_text(paths["markdown"], render_markdown(report))
    return paths
