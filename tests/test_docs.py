import re
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


def test_validation_howto_names_every_check(tmp_path):

    from mmkd.config import config_from_dict
    from mmkd.validation.validate import _checks

    config = config_from_dict(
        {"data": {"manifest": "m.csv", "text": {"max_tokens": 100}},
         "validation": {"label_rules": [{"column": "audio", "pattern": r"(\d)"}]}},
        base_dir=tmp_path,
    )
    names = {check.name for check in _checks(config, ["0", "1"])}
    documented = set(re.findall(r"`([a-z0-9_<>:]+)`", (DOCS / "howto-validate.md").read_text(encoding="utf-8")))
    # Names that carry a class, split, modality or rule are documented in their general form.
    general_forms = [
        (r"^min_rows_per_class:\w+$", "min_rows_per_class:<class>"),
        (r"^(rows_in_split|split_share):\w+$", r"\1:<split>"),
        (r"per_split:\w+:\w+$", "per_split:<split>:<class>"),
        (r"^label_from_audio", "<rule>"),
        (r"^(image|audio)_coverage$", "<modality>_coverage"),
    ]
    generic = set()
    for name in names:
        for pattern, general in general_forms:
            name = re.sub(pattern, general, name)
        generic.add(name)
    assert generic - documented == set()


def test_plugin_howto_shows_the_fixture_word_for_word():
    fixture = Path(__file__).parent / "fixtures" / "mmkd-example-plugin"
    page = (DOCS / "plugins.md").read_text(encoding="utf-8")
    for name in ("src/mmkd_example_plugin/__init__.py", "pyproject.toml"):
        assert (fixture / name).read_text(encoding="utf-8") in page, name


def test_deploy_howto_stage_inputs_match_code():
    from mmkd.stage_cache import STAGE_INPUTS

    text = (DOCS / "howto-deploy.md").read_text(encoding="utf-8")
    documented = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in STAGE_INPUTS:
            sections = tuple(part.strip("` ") for part in cells[1].split(","))
            after = () if cells[2].startswith("(") else tuple(part.strip() for part in cells[2].split(","))
            documented[cells[0]] = (sections, after)
    assert documented == STAGE_INPUTS


def test_deploy_howto_names_every_deployment():
    import yaml

    deployments = yaml.safe_load((DOCS.parent / "deployments" / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
    text = (DOCS / "howto-deploy.md").read_text(encoding="utf-8")
    for deployment in deployments:
        assert f"`{deployment['name']}`" in text


def test_training_howto_settings_are_valid_config(tmp_path):
    import textwrap

    import yaml

    from mmkd.config import RunConfig, TrainConfig, config_from_dict

    text = (DOCS / "howto-train.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(textwrap.dedent(block)) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert len(blocks) >= 6
    for block in blocks:
        # A block of one stage's train settings is shown without its section.
        if set(block) <= set(TrainConfig.model_fields) - set(RunConfig.model_fields):
            block = {"distill": {"train": block}}
        raw = {"data": {"manifest": "m.csv"}}
        for section, values in block.items():
            raw[section] = {**raw[section], **values} if section in raw else values
        config_from_dict(raw, base_dir=tmp_path)
