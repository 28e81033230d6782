"""Run records, the runs table, comparison and --reproduce: finished, stopped (SIGINT), failed and crashed (SIGKILL)
runs in one folder, read back from their files only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import imgclf
from conftest import FAST, run_cli
from imgclf.errors import TrainingDiverged
from imgclf.files import read_csv


def start_training(data: Path, out: Path, name: str) -> subprocess.Popen:
    """`imgclf train` in its own process, long enough (200 epochs) to be stopped from outside."""
    command = [sys.executable, "-m", "imgclf", "train", str(data), "--img-size", "16", "--batch-size", "4"]
    command += ["--epochs", "200", "--set", "model.width=8", "--out", str(out), "--name", name, "--no-report"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_an_epoch(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "history.csv").exists() and read_csv(run / "history.csv"):
            return
        if process.poll() is not None:
            pytest.fail(f"training ended early: {process.stderr.read()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail("training did not finish an epoch in time")


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory, digits_source) -> Path:
    """runs/: three finished runs (lr 0.002, 0.005, 0.01), one stopped by SIGINT, one failed (diverged), one
    crashed (SIGKILL: its status.json still says running)."""
    out = tmp_path_factory.mktemp("table") / "runs"
    for name, lr in (("a", 0.002), ("b", 0.005), ("c", 0.01)):
        imgclf.train(digits_source, {**FAST, "train": {**FAST["train"], "lr": lr}}, out=out, name=name, report=False)
    diverging = {**FAST, "train": {**FAST["train"], "optimizer": "sgd", "lr": 1e12, "scheduler": "none"}}
    with pytest.raises(TrainingDiverged):
        imgclf.train(digits_source, diverging, out=out, name="failed", report=False)
    for name, sig in (("stopped", signal.SIGINT), ("crashed", signal.SIGKILL)):
        process = start_training(digits_source, out, name)
        wait_for_an_epoch(out / name, process)
        if sig == signal.SIGKILL:  # alive, the same record reads "running" in the table: only a dead pid crashes
            live = json.loads(run_cli("runs", "--dir", out, "--json").output)
            assert {run["name"]: run["status"] for run in live}[name] == "running"
        process.send_signal(sig)
        process.communicate(timeout=120)
        assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    return out


def test_the_runs_table_tells_each_status(runs_folder):
    result = run_cli("runs", "--dir", runs_folder, "--json")
    assert result.exit_code == 0, result.output
    runs = {run["name"]: run for run in json.loads(result.output)}
    assert {name: run["status"] for name, run in runs.items()} == {
        "a": "finished",
        "b": "finished",
        "c": "finished",
        "failed": "failed",
        "stopped": "stopped",
        "crashed": "crashed",
    }
    assert runs["a"]["reason"] == "all 2 epochs ran"
    assert "loss became nan" in runs["failed"]["reason"]
    assert runs["stopped"]["reason"].startswith("SIGINT: stopped in epoch")
    assert "ended without a word" in runs["crashed"]["reason"]
    raw = json.loads((runs_folder / "crashed" / "status.json").read_text())
    assert raw["status"] == "running"  # what the killed process left; the table knows its pid is gone
    for name in ("a", "b", "c"):
        run = runs[name]
        assert run["epochs"] == run["epochs_planned"] == 2 and run["test_acc"] is not None
        assert run["model"] == "small_cnn" and run["minutes"] is not None
    assert len({runs[name]["data"] for name in ("a", "b", "c", "failed")}) == 1  # same images, same split
    assert runs["stopped"]["epochs"] >= 1 and runs["stopped"]["test_acc"] is None
    assert (runs_folder / "stopped" / "status.json").is_file()


def test_the_table_sorts_by_any_metric_and_prints_every_run(runs_folder):
    ordered = json.loads(run_cli("runs", "--dir", runs_folder, "--json", "--sort", "best_val_loss").output)
    finished = [run for run in ordered if run["best_val_loss"] is not None]
    losses = [run["best_val_loss"] for run in finished]
    assert losses == sorted(losses)  # a loss: lowest first
    by_f1 = json.loads(run_cli("runs", "--dir", runs_folder, "--json", "--sort", "macro_f1").output)
    scores = [run["metrics"]["macro_f1"] for run in by_f1 if "macro_f1" in run["metrics"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert [run["name"] for run in by_f1[3:]] == [run["name"] for run in by_f1 if not run["metrics"]]
    table = run_cli("runs", "--dir", runs_folder)
    assert table.exit_code == 0
    for name in ("a", "b", "c", "failed", "stopped", "crashed"):
        assert name in table.output
    bad = run_cli("runs", "--dir", runs_folder, "--sort", "acuracy")
    assert bad.exit_code == 2 and "--sort takes a column" in " ".join(bad.output.split())


def test_compare_writes_the_differing_keys_and_every_test_accuracy(runs_folder, tmp_path):
    result = run_cli("runs", "compare", runs_folder / "a", runs_folder / "b", runs_folder / "c", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "train.lr" in result.output
    page = (tmp_path / "compare.html").read_text()
    assert '<tr class="differs"><td>train.lr</td><td>0.002</td><td>0.005</td><td>0.01</td></tr>' in page
    for name in ("a", "b", "c"):
        accuracy = json.loads((runs_folder / name / "metrics.json").read_text())["accuracy"]
        assert f"<td>{accuracy:.4g}</td>" in page
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    comparison = imgclf.compare_runs([runs_folder / "a", runs_folder / "b"], tmp_path / "api")
    assert comparison.differing == {"train.lr": [0.002, 0.005]}
    one = run_cli("runs", "compare", runs_folder / "a", "--out", tmp_path)
    assert one.exit_code == 2 and "at least two" in one.output


def test_a_run_evaluates_from_another_working_directory(runs_folder, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli("evaluate", runs_folder / "a", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] > 0


def test_an_empty_or_missing_runs_folder_is_said(tmp_path):
    assert "no runs in" in run_cli("runs", "--dir", tmp_path).output
    missing = run_cli("runs", "--dir", tmp_path / "nope")
    assert missing.exit_code == 1 and "runs folder not found" in missing.output


# --- reproduce ------------------------------------------------------------------------------------------------


def history_without_times(run: Path) -> list[dict[str, str]]:
    return [
        {key: value for key, value in row.items() if key not in ("seconds", "images_per_s")}
        for row in read_csv(run / "history.csv")
    ]


def test_reproduce_on_the_same_files_gives_the_same_history(runs_folder, tmp_path):
    result = run_cli("train", "--reproduce", runs_folder / "b", "--out", tmp_path, "--name", "again", "--no-report")
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    assert history_without_times(again) == history_without_times(runs_folder / "b")
    assert (again / "config.yaml").read_text() == (runs_folder / "b" / "config.yaml").read_text()
    assert json.loads((again / "env.json").read_text())["reproduces"] == str((runs_folder / "b").resolve())
    refused = run_cli("train", "--reproduce", runs_folder / "b", "--lr", "0.1", "--out", tmp_path)
    assert refused.exit_code == 2 and "--lr would make it another run" in " ".join(
        refused.output.replace("│", " ").split()
    )


def test_reproduce_refuses_a_changed_folder_and_names_the_differences(digits_flat, tmp_path):
    run = imgclf.train(digits_flat, FAST, out=tmp_path, name="on-flat", report=False).run_dir
    shutil.copy(digits_flat / "digit0" / "0000.png", digits_flat / "digit1" / "new.png")  # added
    (digits_flat / "digit2" / "0002.png").unlink()  # removed
    changed = digits_flat / "digit0" / "0010.png"
    changed.write_bytes((digits_flat / "digit0" / "0020.png").read_bytes())  # other content, same name
    result = run_cli("train", "--reproduce", run, "--out", tmp_path / "out")
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "1 added (digit1/new.png)" in text and "1 removed (digit2/0002.png)" in text
    assert "changed (digit0/0010.png)" in text and "Nothing was trained" in text
    assert not (tmp_path / "out").exists()


def test_status_records_a_resumed_run_across_sessions(tmp_path, digits_source):
    run = imgclf.train(digits_source, FAST, out=tmp_path, name="r", report=False).run_dir
    first = json.loads((run / "status.json").read_text())
    imgclf.train(None, resume=run, epochs=3, report=False)
    second = json.loads((run / "status.json").read_text())
    assert (first["sessions"], second["sessions"]) == (1, 2)
    assert second["started"] == first["started"] and second["status"] == "finished"
    assert second["seconds"] > first["seconds"] and second["pid"] == os.getpid()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["epochs"] == 3


def test_the_table_shows_the_epoch_and_weights_the_run_shipped(tmp_path):
    """A run that shipped its EMA weights: the table's best epoch and validation figures are the averaged weights'
    at the epoch model.json names, not the raw weights' best epoch by val_loss."""
    from imgclf.files import write_csv_atomic
    from imgclf.tracking.runs import summarize_run

    run = tmp_path / "ema-run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "small_cnn"}, "train": {"epochs": 3}}))
    columns = ["epoch", "val_loss", "val_acc", "val_loss_ema", "val_acc_ema", "seconds"]
    rows = [[1, 0.50, 0.80, 0.60, 0.75, 1.0], [2, 0.40, 0.85, 0.35, 0.88, 1.0], [3, 0.45, 0.84, 0.30, 0.90, 1.0]]
    write_csv_atomic(run / "history.csv", columns, rows)
    training = {"best_epoch": 3, "val_loss": 0.30, "weights": "ema"}
    (run / "model" / "model.json").write_text(json.dumps({"training": training}))
    summary = summarize_run(run)
    assert (summary["best_epoch"], summary["best_val_acc"], summary["best_val_loss"]) == (3, 0.90, 0.30)
    (run / "model" / "model.json").unlink()  # before the run ships: the raw weights' best by val_loss
    summary = summarize_run(run)
    assert (summary["best_epoch"], summary["best_val_acc"], summary["best_val_loss"]) == (2, 0.85, 0.40)
