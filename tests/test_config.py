"""The typed config: defaults, YAML round trip, precedence and error messages."""

from __future__ import annotations

import pytest
import yaml

from imgclf.config import NULL, RunConfig, build_config, dump_config, load_config, parse_assignments
from imgclf.errors import ConfigError


def test_every_field_is_documented():
    text = dump_config(RunConfig())
    for line in text.splitlines():
        if line.strip() and not line.rstrip().endswith(":") and ":" in line and "#" not in line:
            pytest.fail(f"undocumented config line: {line}")


def test_yaml_round_trip_keeps_every_value():
    config = build_config(None, {"train.lr": 0.01, "data.split_ratios": [0.7, 0.2, 0.1], "model.name": "resnet18"})
    assert build_config(yaml.safe_load(dump_config(config))) == config


def test_precedence_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.1\n", encoding="utf-8")
    config = load_config(path, {"train.lr": 0.5, "train.batch_size": None})
    assert (config.train.epochs, config.train.lr, config.train.batch_size) == (7, 0.5, "auto")


def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch'"):
        build_config({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"train\.optimizer: .*'adamw', 'adam' or 'sgd'.*received 'lion'"):
        build_config(None, {"train.optimizer": "lion"})
    with pytest.raises(ConfigError, match="sum to 1"):
        build_config(None, {"data.split_ratios": [0.5, 0.5, 0.5]})
    with pytest.raises(ConfigError, match="is a value, not a section"):
        build_config(RunConfig(), {"train.lr.x": 1})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_set_assignments_parse_yaml_values():
    assert parse_assignments(["train.lr=0.01", "augment.hflip=false", "train.grad_clip=null"]) == {
        "train.lr": 0.01,
        "augment.hflip": False,
        "train.grad_clip": NULL,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignments(["train.lr"])


def test_set_null_sets_a_key_to_null_where_a_missing_flag_changes_nothing():
    base = build_config(None, {"train.grad_clip": 1.0})
    nulled = build_config(base, parse_assignments(["train.early_stopping.patience=null", "train.grad_clip=null"]))
    assert nulled.train.early_stopping.patience is None and nulled.train.grad_clip is None
    assert build_config(base, {"train.grad_clip": None}).train.grad_clip == 1.0  # None: a flag not given


def test_configs_are_immutable():
    config = RunConfig()
    with pytest.raises(Exception, match="frozen"):
        config.train.epochs = 3


def test_yaml_words_stay_words():
    assert parse_assignments(["data.cache=off", "augment.preset=none"]) == {
        "data.cache": "off",
        "augment.preset": "none",
    }
    assert build_config({"data": {"cache": False}}).data.cache == "off"  # `cache: off` in a YAML file


def test_a_time_budget_without_epochs_is_capped_far_out_the_same_everywhere(tmp_path):
    """train --time, tune --time, the Python API and a YAML train.time_budget all let the budget decide the length
    (before, only train --time lifted the 12-epoch default)."""
    from imgclf.config import BUDGET_EPOCHS

    assert build_config(None, {"train.time_budget": "2m"}).train.epochs == BUDGET_EPOCHS == 1000
    assert build_config({"train": {"time_budget": "2m"}}).train.epochs == BUDGET_EPOCHS
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  time_budget: 90s\n", encoding="utf-8")
    assert load_config(recipe).train.epochs == BUDGET_EPOCHS
    assert build_config(None, {"train.time_budget": "2m", "train.epochs": 5}).train.epochs == 5  # an explicit cap
    assert build_config(None, {}).train.epochs == 12  # no budget: the default
    again = yaml.safe_load(dump_config(build_config(None, {"train.time_budget": "2m"})))
    assert again["train"]["epochs"] == BUDGET_EPOCHS  # config.yaml records the cap


def test_messages_below_the_cli_name_keys_and_the_cli_spells_them_as_flags():
    from imgclf.flags import FLAGS, flag_for, keys_to_flags

    assert flag_for("train.lr") == "--lr" and flag_for("augment.hflip") == "--hflip"
    assert flag_for("train.warmup_epochs") == "--set train.warmup_epochs"  # no flag of its own
    assert len({flag.key for flag in FLAGS}) == len({flag.spelling for flag in FLAGS}) == len(FLAGS)
    message = "train.lr, model.name would make it another run; these apply: train.epochs, train.device"
    assert keys_to_flags(message) == "--lr, --model would make it another run; these apply: --epochs, --device"
    for kept in (
        "unknown key 'train.learning_rate'; did you mean train.lr?",  # for a YAML file or --set: a key
        "unknown key 'train.calibrat'; did you mean train.calibrate or train.lr?",  # every suggestion stays a key
        "did you mean train.calibrate, train.lr or model.name",
        "augment.preset = 'heavy' is not a valid setting",
        "invalid configuration: train.lr: must be positive",
        "--set train.lr=0.1",
    ):
        assert keys_to_flags(kept) == kept
