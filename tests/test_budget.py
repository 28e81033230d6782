"""Training to a time budget (the schedule fitted to the steps that fit, ending on time and complete) and weight
averaging (EMA validated beside the weights, the better one shipped), on the digits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import imgclf
from conftest import run_cli, write_digits
from imgclf.files import read_csv
from imgclf.training.checkpoint import load_checkpoint
from imgclf.training.optim import PlannedCosine

BUDGET = 20.0
# The stated tolerance: 5 % of the budget, and at least 2 s for short budgets (one validation pass, or a busy
# machine's hiccup in the last epoch, is that long).
TOLERANCE = max(0.05 * BUDGET, 2.0)
RECIPE = ["--img-size", "16", "--set", "model.width=8", "--set", "train.early_stopping.patience=null", "--no-report"]


@pytest.fixture(scope="module")
def digits_ten(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("budget") / "flat", classes=tuple(range(10)), per_class=60)


def final_lr_fraction(run: Path) -> float:
    """The schedule's factor at the last step (1 = the peak LR, 0 = the end of the cosine), from last.safetensors."""
    checkpoint = load_checkpoint(run / "checkpoints" / "last.safetensors")
    plan = checkpoint.schedule["lr_lambdas"][0]
    return PlannedCosine(plan["total"], plan["warmup"])(checkpoint.schedule["last_epoch"])


@pytest.mark.slow
def test_a_time_budget_ends_on_time_with_the_schedule_complete(tmp_path, digits_ten):
    result = run_cli("train", digits_ten, "--time", "20s", *RECIPE, "--out", tmp_path, "--name", "b")
    assert result.exit_code == 0, result.output
    run = tmp_path / "b"
    history = read_csv(run / "history.csv")
    elapsed = float(history[-1]["budget_s"])
    assert abs(elapsed - BUDGET) <= TOLERANCE, elapsed
    steps = sum(int(row["steps"]) for row in history)
    assert int(history[-1]["planned_steps"]) == steps  # the run took the steps of its last plan
    assert final_lr_fraction(run) <= 0.01  # the cosine ran to its end: the LR within 1 % of it (0)
    assert all(row["planned_steps"] for row in history)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["time_budget"] == "20s" and config["train"]["epochs"] == 1000  # --time alone: no cap
    status = json.loads((run / "status.json").read_text())
    assert status["reason"].startswith("time budget of 20s:") and "first estimate" in status["reason"]
    assert len(history) > 2 and int(history[-1]["steps"]) <= int(history[0]["steps"])


@pytest.mark.slow
def test_epochs_cap_a_budget_and_a_resumed_budget_continues_its_plan(tmp_path, digits_ten):
    capped = run_cli("train", digits_ten, "--time", "10m", "--epochs", "2", *RECIPE, "--out", tmp_path, "--name", "c")
    assert capped.exit_code == 0, capped.output
    history = read_csv(tmp_path / "c" / "history.csv")
    assert len(history) == 2 and float(history[-1]["budget_s"]) < 60  # two epochs, not ten minutes
    assert final_lr_fraction(tmp_path / "c") <= 0.01  # the plan shrank to the cap: still complete

    command = [sys.executable, "-m", "imgclf", "train", str(digits_ten), "--time", "20s", *RECIPE]
    command += ["--out", str(tmp_path), "--name", "r"]
    log = tmp_path / "r.log"
    with open(log, "w") as stderr:  # a file, not a pipe nobody reads while waiting
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    deadline = time.monotonic() + 180
    while not ((tmp_path / "r" / "history.csv").exists() and len(read_csv(tmp_path / "r" / "history.csv")) >= 4):
        assert process.poll() is None and time.monotonic() < deadline, (process.poll(), log.read_text()[-2000:])
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    before = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.safetensors").meta["budget"]
    assert 0 < before["elapsed"] < BUDGET and before["planned"] > 0
    resumed = run_cli("train", "--resume", tmp_path / "r")
    assert resumed.exit_code == 0, resumed.output
    history = read_csv(tmp_path / "r" / "history.csv")
    elapsed = float(history[-1]["budget_s"])
    assert abs(elapsed - BUDGET) <= TOLERANCE, elapsed  # both sessions together: the one budget
    assert final_lr_fraction(tmp_path / "r") <= 0.01
    assert int(history[-1]["planned_steps"]) == sum(int(row["steps"]) for row in history)


@pytest.mark.slow
def test_ema_weights_differ_and_the_better_one_by_validation_is_shipped(tmp_path, digits_ten):
    config = {
        "data": {"img_size": 16},
        "model": {"width": 8},
        "augment": {"preset": "light", "hflip": False},
        "train": {"epochs": 5, "batch_size": 16, "ema": True, "ema_decay": 0.99},
    }
    result = imgclf.train(digits_ten, config, out=tmp_path, name="e", report=False)
    run = result.run_dir
    raw = load_checkpoint(run / "checkpoints" / "best.safetensors").model
    averaged = load_checkpoint(run / "checkpoints" / "best_ema.safetensors").model
    assert raw.keys() == averaged.keys()
    assert any(not raw[k].equal(averaged[k]) for k in raw if raw[k].is_floating_point())
    history = read_csv(run / "history.csv")
    best_raw = min(float(row["val_loss"]) for row in history)
    best_ema = min(float(row["val_loss_ema"]) for row in history)
    expected = "ema" if best_ema < best_raw else "raw"
    training = json.loads((run / "model" / "model.json").read_text())["training"]
    assert training["weights"] == result.weights == expected
    kept = next(row for row in history if int(row["epoch"]) == training["best_epoch"])
    column = "val_acc_ema" if expected == "ema" else "val_acc"
    # the shipped bundle, evaluated again on the validation split with its own (averaged) BatchNorm statistics,
    # scores what the epoch's validation recorded
    again = imgclf.evaluate(run, split="val", out=tmp_path / "val")
    assert again.metrics["accuracy"] == pytest.approx(float(kept[column]), abs=1e-6)


def test_a_time_budget_needs_the_cosine_schedule_and_a_duration():
    from imgclf.config import build_config
    from imgclf.errors import ConfigError

    with pytest.raises(ConfigError, match="scheduler must be cosine"):
        build_config(None, {"train.time_budget": "10m", "train.scheduler": "step"})
    with pytest.raises(ConfigError, match="positive duration such as 90s"):
        build_config(None, {"train.time_budget": "ten minutes"})
    bad = run_cli("train", "data", "--time", "-5m")
    assert bad.exit_code == 2 and "positive duration" in " ".join(bad.output.split())
