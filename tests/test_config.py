from pathlib import Path

import pytest
import yaml

from mmkd.config import RunConfig, config_from_dict, load_config
from mmkd.errors import ConfigError
from mmkd.registry import get_registry


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_minimal_config_gets_documented_defaults_and_resolves_paths(tmp_path):
    config = load_config(write_yaml(tmp_path / "c.yaml", {"data": {"manifest": "data/m.csv"}}))
    assert config.data.manifest == (tmp_path / "data" / "m.csv").resolve()
    assert config.teacher.fusion.name == "attention"
    assert [t.name for t in config.distill.losses] == ["hinton", "mse"]
    assert config.data.audio.num_samples == 10800


def test_unknown_key_is_rejected_with_the_valid_keys_and_closest_match(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"manifest": "m.csv"}, "teacher": {"embed_dims": 4}})
    with pytest.raises(ConfigError, match=r"unknown key 'teacher\.embed_dims'\. Did you mean 'embed_dim'\?") as info:
        load_config(path)
    assert "Valid keys here: audio_encoder, checkpoint, dropout, embed_dim, freeze, fusion, image_encoder, lora, text_encoder, train" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_top_level_key_lists_the_top_level_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'sede'\. Did you mean 'seed'\?.*benchmark, channels_last, compile, data, device"):
        load_config(write_yaml(tmp_path / "c.yaml", {"data": {"manifest": "m.csv"}, "sede": 1}))


def test_out_of_range_value_names_the_key_and_the_value(tmp_path):
    raw = {"data": {"manifest": "m.csv"}, "distill": {"train": {"epochs": 0}}}
    with pytest.raises(ConfigError, match=r"distill\.train\.epochs: Input should be greater than or equal to 1 \(got 0\)"):
        config_from_dict(raw, base_dir=tmp_path)


def test_unknown_loss_name_lists_the_registered_losses(tmp_path):
    raw = {"data": {"manifest": "m.csv"}, "distill": {"losses": [{"name": "hintn"}]}}
    with pytest.raises(ConfigError, match=r"distill\.losses\[0\]\.name: Unknown losses plugin 'hintn'.*hinton, kl, mse.*Did you mean 'hinton'"):
        config_from_dict(raw, base_dir=tmp_path)


def test_unknown_fusion_name_gives_a_short_message(tmp_path):
    raw = {"data": {"manifest": "m.csv"}, "teacher": {"fusion": {"name": "attn"}}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, base_dir=tmp_path)
    message = str(info.value)
    available = ", ".join(get_registry("fusion").names())
    assert message == (
        f"config: teacher.fusion.name: Unknown fusion plugin 'attn'. Available: {available}. "
        "Did you mean 'attention'?"
    )


def test_student_defaults_are_ten_times_smaller_than_teacher_defaults(tmp_path):
    from mmkd.checkpoints import build_model
    from mmkd.models.multimodal import count_parameters

    config = config_from_dict({"data": {"manifest": "m.csv"}, "student": {"dropout": 0.2}}, base_dir=tmp_path)
    classes = [str(d) for d in range(10)]
    teacher = count_parameters(build_model(config, "teacher", classes))
    student = count_parameters(build_model(config, "student", classes))
    assert student * 10 <= teacher


def test_plugin_parameters_are_validated_by_the_plugin_model(tmp_path):
    raw = {"data": {"manifest": "m.csv"}, "distill": {"losses": [{"name": "kl", "params": {"temperature": -1}}]}}
    with pytest.raises(ConfigError, match=r"distill\.losses\[0\]\.params: temperature"):
        config_from_dict(raw, base_dir=tmp_path)


def test_missing_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"must hold a mapping of keys, found list"):
        load_config(path)


def test_invalid_yaml_is_reported_with_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {manifest: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.yaml is not valid YAML"):
        load_config(path)


def test_packaged_demo_config_is_valid(tmp_path):
    from importlib import resources

    raw = yaml.safe_load(resources.files("mmkd").joinpath("configs/avdigits.yaml").read_text())
    config = config_from_dict(raw, base_dir=tmp_path)
    assert isinstance(config, RunConfig)
    assert config.teacher.fusion.params == {"dim": 128, "heads": 4}


def test_fingerprint_changes_with_any_value(tmp_path):
    first = config_from_dict({"data": {"manifest": "m.csv"}}, base_dir=tmp_path)
    second = config_from_dict({"data": {"manifest": "m.csv"}, "seed": 1}, base_dir=tmp_path)
    assert first.fingerprint() == config_from_dict({"data": {"manifest": "m.csv"}}, base_dir=tmp_path).fingerprint()
    assert first.fingerprint() != second.fingerprint()
