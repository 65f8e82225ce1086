"""Config loading: strict keys, typed values, overrides, method knobs; every shipped config validates."""

from pathlib import Path

import pytest

from lifelong.cli import CONFIG_DIR
from lifelong.errors import ConfigError
from lifelong.learn.driver import load_run_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if path.read_text().startswith("# lifelong bench edit"):
        from lifelong.edit.bench import load_bench_config

        config = load_bench_config(path)
    else:
        config = load_run_config(path)
    assert config.methods


def test_shipped_configs_open_with_their_command():
    for path in CONFIG_DIR.glob("*.yaml"):
        assert path.read_text().startswith("# lifelong "), path


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_run_config(write(tmp_path, "nmae: x\n"))
    assert "nmae" in str(e.value) and "valid keys" in str(e.value) and "name" in str(e.value)


def test_unknown_nested_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*valid keys in train: .*lr"):
        load_run_config(write(tmp_path, "train:\n  learning_rate: 0.1\n"))


def test_unknown_method_knob_lists_the_methods_knobs(tmp_path):
    with pytest.raises(ConfigError, match=r"methods\.0\.temprature.*temperature"):
        load_run_config(None, ["methods=[{name: lwf, temprature: 3}]"])


def test_unknown_method_lists_methods():
    with pytest.raises(ConfigError, match="finetune.*lwf.*ewc.*wise_ft"):
        load_run_config(None, ["methods=[sgd]"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="train.steps_per_task must be an integer"):
        load_run_config(None, ["train.steps_per_task=many"])


def test_overrides_set_nested_values_and_list_items():
    config = load_run_config(None, ["train.lr=0.5", "methods=[finetune, lwf]", "methods.1.reg_weight=3", "model.resolution=64"])
    assert config.train.lr == 0.5 and config.model.resolution == 64
    assert [m.name for m in config.methods] == ["finetune", "lwf"]
    assert config.methods[1].params == {"reg_weight": 3}


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_run_config(None, ["train.lr"])


def test_bad_choice_and_ranges():
    with pytest.raises(ConfigError, match="adapter.kind='lorra' is not one of"):
        load_run_config(None, ["adapter.kind=lorra"])
    with pytest.raises(ConfigError, match="wise_ft alpha"):
        load_run_config(None, ["methods=[{name: wise_ft, alpha: 2}]"])
    with pytest.raises(ConfigError, match="train.lr must be positive"):
        load_run_config(None, ["train.lr=0"])


def test_duplicate_method_labels_rejected():
    with pytest.raises(ConfigError, match="distinct `label`"):
        load_run_config(None, ["methods=[finetune, finetune]"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "a: [1,\n"))


def test_a_method_overrides_train_keys_for_itself_only():
    from lifelong.config import method_train

    config = load_run_config(None, ["train.lr=1e-4", "methods=[finetune, {name: o_lora, train: {lr: 1e-3, steps_per_task: 7}}]"])
    plain, own = (method_train(config, m) for m in config.methods)
    assert plain == config.train
    assert own.lr == 1e-3 and own.steps_per_task == 7 and own.batch_size == config.train.batch_size
    with pytest.raises(ConfigError, match=r"methods\.1\.train\.lrr.*valid keys in methods\.1\.train: .*lr"):
        load_run_config(None, ["methods=[finetune, {name: o_lora, train: {lrr: 1e-3}}]"])
    with pytest.raises(ConfigError, match=r"methods\.0\.train\.lr must be positive"):
        load_run_config(None, ["methods=[{name: finetune, train: {lr: 0}}]"])
