"""`--resume` does what it says: the flags it can apply apply, the others are refused by name; a finished run
trained further gets a schedule of its own; a shortened warmup is said. What `--resume` and `--reproduce` refuse is
the workflow's rule alone: the API's refusal names config keys, the CLI's the same refusal with the keys' flags."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

import imgclf
from conftest import FAST, run_cli
from imgclf.evaluation.diagnose import read_history


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_source) -> Path:
    """Two epochs of the default cosine schedule, finished."""
    config = {**FAST, "train": {**FAST["train"], "epochs": 2, "warmup_epochs": 0.2}}
    out = tmp_path_factory.mktemp("resume")
    return imgclf.train(digits_source, config, out=out, name="done", report=False).run_dir


@pytest.fixture
def run_copy(tmp_path, finished_run) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def test_flags_that_would_change_the_run_are_refused_by_name(run_copy):
    before = (run_copy / "config.yaml").read_text()
    result = run_cli(
        "train", "--resume", run_copy, "--epochs", "3", "--lr", "0.1", "--model", "resnet18", "--augment", "strong"
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    for flag in ("--lr", "--model", "--augment"):
        assert flag in text
    assert "--epochs" not in text.split("would make")[0]  # --epochs applies
    assert (run_copy / "config.yaml").read_text() == before  # nothing changed, nothing trained
    assert len(read_history(run_copy / "history.csv")) == 2
    refused_set = run_cli("train", "--resume", run_copy, "--set", "train.weight_decay=0.5")
    assert refused_set.exit_code == 2
    assert "--weight-decay would make it another run" in " ".join(refused_set.output.split())
    with pytest.raises(imgclf.ConfigError, match=r"train\.lr"):
        imgclf.train(None, resume=run_copy, epochs=3, resume_settings={"train.lr": 0.1})


def test_the_api_refuses_a_change_by_its_keys_and_the_cli_the_same_change_by_its_flags(run_copy):
    """One rule, two spellings: `train.lr` (has a flag) and `train.warmup_epochs` (has none, so the CLI keeps the
    key); the allowed settings are listed the same way."""
    with pytest.raises(imgclf.ConfigError) as refused:
        imgclf.train(None, resume=run_copy, epochs=3, resume_settings={"train.lr": 0.1, "train.warmup_epochs": 1})
    message = str(refused.value)
    assert "train.lr, train.warmup_epochs would make it another run" in message
    assert "may change: train.epochs, train.early_stopping.patience, train.device" in message
    assert "--" not in message  # no CLI spelling in an API error
    result = run_cli("train", "--resume", run_copy, "--epochs", "3", "--lr", "0.1", "--set", "train.warmup_epochs=1")
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "--lr, train.warmup_epochs would make it another run" in text
    assert "may change: --epochs, --patience, --device" in text
    assert len(read_history(run_copy / "history.csv")) == 2  # nothing trained


def test_reproduce_refuses_a_change_by_its_keys_in_the_api_and_by_its_flags_in_the_cli(finished_run, tmp_path):
    with pytest.raises(imgclf.ConfigError) as refused:
        imgclf.reproduce(finished_run, out=tmp_path, settings={"train.lr": 0.1, "train.device": "cpu"})
    message = str(refused.value)
    assert "train.lr would make it another run" in message and "may change: train.device" in message
    assert "--" not in message
    result = run_cli("train", "--reproduce", finished_run, "--lr", "0.1", "--device", "cpu", "--out", tmp_path)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "--lr would make it another run" in text and "may change: --device" in text
    assert list(tmp_path.iterdir()) == []  # nothing scanned into a new run


def test_the_api_refuses_what_only_a_new_run_takes_with_resume(run_copy, digits_source):
    """A data folder, a run name, a config or a fast dev run were silently dropped by `train(resume=...)`; they are
    refused like the CLI's DATA and --name."""
    before = (run_copy / "config.yaml").read_text()
    with pytest.raises(imgclf.ConfigError, match="a data folder, a run name would make it another run"):
        imgclf.train(digits_source, resume=run_copy, epochs=3, name="other", report=False)
    with pytest.raises(imgclf.ConfigError, match="a config, a fast dev run would make it another run"):
        imgclf.train(None, {"train": {"lr": 0.1}}, resume=run_copy, epochs=3, fast_dev_run=True, report=False)
    assert (run_copy / "config.yaml").read_text() == before
    assert len(read_history(run_copy / "history.csv")) == 2
    result = run_cli("train", digits_source, "--resume", run_copy, "--name", "other", "--epochs", "3")
    assert result.exit_code == 2 and "a data folder, a run name would make it another run" in " ".join(
        result.output.split()
    )


def test_a_mistyped_key_on_resume_is_an_unknown_key_not_another_run(run_copy):
    result = run_cli("train", "--resume", run_copy, "--set", "train.learning_rate=0.1")
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "unknown key 'train.learning_rate'; did you mean train.lr?" in text and "another run" not in text


def test_epochs_among_the_resume_settings_apply(run_copy):
    """`resume_settings={"train.epochs": N}` is `epochs=N` (it was overwritten by the absent `epochs`)."""
    result = imgclf.train(None, resume=run_copy, resume_settings={"train.epochs": 3}, report=False)
    assert result.history[-1]["epoch"] == 3


def test_a_config_file_on_resume_is_judged_key_by_key(run_copy, tmp_path):
    """`--config` gives settings like flags do: its keys that may change on resume apply, the others are refused
    by their flags."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  name: resnet18\ntrain:\n  epochs: 3\n", encoding="utf-8")
    refused = run_cli("train", "--resume", run_copy, "--config", recipe)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "--model would make it another run" in text
    longer = tmp_path / "longer.yaml"
    longer.write_text("train:\n  epochs: 3\ndata:\n  num_workers: 0\n", encoding="utf-8")
    result = run_cli("train", "--resume", run_copy, "--config", longer, "--no-report")
    assert result.exit_code == 0, result.output
    assert len(read_history(run_copy / "history.csv")) == 3


def test_settings_that_can_apply_on_resume_apply(run_copy):
    result = run_cli("train", "--resume", run_copy, "--epochs", "3", "--device", "cpu", "--workers", "0", "--no-report")
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert config["train"]["epochs"] == 3 and config["data"]["num_workers"] == 0
    assert len(read_history(run_copy / "history.csv")) == 3


def test_a_finished_run_trained_further_gets_a_fresh_warmup_and_schedule(run_copy, caplog):
    with caplog.at_level(logging.INFO, logger="imgclf"):
        result = imgclf.train(None, resume=run_copy, epochs=4, report=False)
    rows = read_history(run_copy / "history.csv")
    assert [r["phase"] for r in rows] == ["train", "train", "extension", "extension"]
    peak = 2e-3  # the default lr, the last phase's peak
    # a re-stretched cosine would start epoch 3 halfway down it (~lr/2); the extension starts from a warmup
    # (lr/100) and climbs back to the peak
    assert rows[2]["lr"] == pytest.approx(peak / 100, rel=0.05)
    assert rows[3]["lr"] > 10 * rows[2]["lr"]
    assert result.history[-1]["epoch"] == 4
    assert any("extension phase with a fresh warmup" in r.getMessage() for r in caplog.records)


def test_a_shortened_warmup_is_said(tmp_path, digits_source, caplog):
    config = {**FAST, "train": {**FAST["train"], "epochs": 2, "warmup_epochs": 2.0}}
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        imgclf.train(digits_source, config, out=tmp_path, name="w", report=False)
    (message,) = [r.getMessage() for r in caplog.records if "warmup shortened" in r.getMessage()]
    # 2 epochs of 9 steps: a fifth is 3 steps, a third of an epoch, not the 2 epochs asked for
    assert "shortened to 0.33 epochs (3 steps" in message and "train.warmup_epochs 2" in message
