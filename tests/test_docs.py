from pathlib import Path

import pytest

from mmkd.docgen import GENERATED

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_doc_is_up_to_date(name):
    committed = (DOCS / name).read_text(encoding="utf-8")
    assert committed == GENERATED[name](), f"docs/{name} is stale: run `python -m mmkd.docgen docs/`"


def test_config_reference_documents_every_key_with_a_description():
    text = GENERATED["config.md"]()
    for key in ("`data.manifest`", "`teacher.fusion`", "`distill.losses`", "`export.parity_max_abs_diff`",
                "`benchmark.providers`", "`data.audio.hop_length`"):
        assert key in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows
    assert all(not line.rstrip().endswith("|  |") for line in rows)


def test_plugin_catalog_shows_each_plugin_with_its_parameters():
    text = GENERATED["plugins.md"]()
    for name in ("concat", "attention", "mse", "kl", "hinton"):
        assert f"### `{name}`" in text
    assert "| `temperature` |" in text
    assert "| `alpha` |" in text
