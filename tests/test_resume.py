"""`--resume` does what it says: the flags it can apply apply, the others are refused by name; a finished run
trained further gets a schedule of its own; a shortened warmup is said."""

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
    assert refused_set.exit_code == 2 and "--set train.weight_decay" in " ".join(refused_set.output.split())
    with pytest.raises(imgclf.ConfigError, match=r"train\.lr"):
        imgclf.train(None, resume=run_copy, epochs=3, resume_settings={"train.lr": 0.1})


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
