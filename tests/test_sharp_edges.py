"""Commands that do what they say: evaluate on another folder, predict's exit code and output, runs that work
from any directory, the run's pixel limit everywhere, broken images on the cached path, and messages."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgclf
from conftest import FAST, run_cli, write_digits
from imgclf.errors import DataError
from imgclf.files import read_csv


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("edges")
    data = write_digits(root / "digits", per_class=20)
    config = {**FAST, "data": {**FAST["data"], "max_pixels": 300}}  # 8x8 digits pass, 20x20 images do not
    run = imgclf.train(data, config, out=root / "runs", name="r", report=False).run_dir
    return run, data


# --- evaluate --data ------------------------------------------------------------------------------------------


def test_evaluate_on_a_folder_with_only_test_and_on_that_test_folder(run_and_data, tmp_path):
    run, _ = run_and_data
    other = write_digits(tmp_path / "other", per_class=30, layout="split")
    shutil.rmtree(other / "train")
    shutil.rmtree(other / "val")
    result = run_cli("evaluate", run, "--data", other)
    assert result.exit_code == 0, result.output
    assert (run / "eval-other-test" / "metrics.json").is_file()
    result = run_cli("evaluate", run, "--data", other / "test")  # a flat folder named test: named after both
    assert result.exit_code == 0, result.output
    assert (run / "eval-other-test" / "metrics.json").is_file()
    assert not (run / "eval-test-all").exists()


def test_a_split_asked_of_a_flat_folder_is_refused_and_training_images_are_counted(run_and_data, caplog):
    run, data = run_and_data
    refused = run_cli("evaluate", run, "--data", data, "--split", "test")
    assert refused.exit_code == 2 and "is a flat folder" in flat(refused.output)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        result = imgclf.evaluate(run, data=data)  # the very folder it was trained on
    trained = sum(1 for row in read_csv(run / "manifest.csv") if row["split"] == "train")
    assert result.metrics["split"] == "all"
    assert result.metrics["identical_to_training_images"] == trained
    assert any("identical to training images" in r.getMessage() for r in caplog.records)


# --- predict --------------------------------------------------------------------------------------------------


def test_predict_exits_1_when_nothing_could_be_read(run_and_data, tmp_path):
    run, _ = run_and_data
    result = run_cli("predict", run, tmp_path / "no-such-file.png")
    assert result.exit_code == 1
    assert "none of the 1 input(s) could be read" in flat(result.output)


def test_predict_shows_the_top_k_and_writes_to_standard_output(run_and_data, tmp_path, monkeypatch):
    run, data = run_and_data
    image = sorted((data / "digit1").iterdir())[0]
    table = run_cli("predict", run, image, "--top-k", "3")
    assert table.exit_code == 0
    assert "class 3" in table.output and "p 3" in table.output
    monkeypatch.chdir(tmp_path)
    piped = run_cli("predict", run, image, "--top-k", "2", "--out", "-")
    assert piped.exit_code == 0
    lines = [line for line in piped.stdout.splitlines() if line.startswith(("path,", str(image)))]
    assert lines[0] == "path,label,class_1,probability_1,class_2,probability_2,ood_score,error"
    assert lines[1].startswith(f"{image},digit")
    assert not (tmp_path / "-").exists()


# --- any working directory ------------------------------------------------------------------------------------


def test_a_run_made_with_a_relative_path_works_from_another_directory(tmp_path, monkeypatch):
    here = tmp_path / "project"
    write_digits(here / "data", per_class=15)
    monkeypatch.chdir(here)
    config = {**FAST, "train": {**FAST["train"], "epochs": 1}}
    run = imgclf.train("data", config, out="runs", name="rel", report=False).run_dir.resolve()
    assert all(Path(row["path"]).is_absolute() for row in read_csv(run / "manifest.csv"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_cli("evaluate", run).exit_code == 0
    assert run_cli("report", run).exit_code == 0
    assert run_cli("train", "--resume", run, "--epochs", "2", "--no-report").exit_code == 0


# --- the run's pixel limit ------------------------------------------------------------------------------------


def test_evaluate_and_predict_use_the_runs_pixel_limit(run_and_data, tmp_path):
    run, _ = run_and_data
    big = tmp_path / "big"
    write_digits(big, per_class=3)
    large = big / "digit0" / "large.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(large)  # 400 pixels > the run's 300
    result = run_cli("predict", run, large, big / "digit1")
    assert result.exit_code == 0
    assert "exceeds the limit of 300" in flat(result.output)
    metrics = imgclf.evaluate(run, data=big).metrics
    assert metrics["n"] == 9  # the large image was skipped, the 9 digits evaluated


def test_workers_on_the_cached_path_are_said_to_be_unused(tmp_path, digits_source, caplog):
    config = {**FAST, "data": {**FAST["data"], "num_workers": 2, "cache": "memory"}, "train": {"epochs": 1}}
    with caplog.at_level(logging.INFO, logger="imgclf"):
        imgclf.train(digits_source, config, out=tmp_path, name="w", report=False)
    assert any("data.num_workers = 2 is not used" in r.getMessage() for r in caplog.records)


# --- broken images on the cached path -------------------------------------------------------------------------


def test_too_many_broken_images_on_the_cached_path_stop_before_training(tmp_path, monkeypatch):
    data = write_digits(tmp_path / "data", per_class=20)
    import imgclf.workflow as workflow

    original = workflow._prepare

    def prepare_then_break(*args, **kwargs):
        prepared = original(*args, **kwargs)
        for path in sorted(data.glob("digit2/*.png"))[:6]:
            path.write_bytes(b"no longer an image")
        return prepared

    monkeypatch.setattr(workflow, "_prepare", prepare_then_break)
    config = {**FAST, "data": {"img_size": 16, "cache": "memory", "max_bad_images": 2}}
    with pytest.raises(DataError, match=r"before training.*nothing was trained") as failure:
        imgclf.train(data, config, out=tmp_path / "runs", name="r", report=False)
    assert failure.value.exit_code == 1
    assert not (tmp_path / "runs" / "r" / "checkpoints" / "last.safetensors").exists()


# --- messages -------------------------------------------------------------------------------------------------


def test_messages_name_what_is_wrong_and_what_was_meant(tmp_path, digits_source):
    loose = tmp_path / "loose"
    loose.mkdir()
    for path in sorted((digits_source / "digit0").iterdir())[:5]:
        shutil.copy(path, loose / path.name)
    result = run_cli("train", loose, "--out", tmp_path / "runs")
    assert result.exit_code == 2  # a usage hint before any work (tests/test_lab.py); the scan says it too:
    text = flat(result.output)
    assert "but no class folders" in text and "unreadable" not in text
    with pytest.raises(DataError, match="lie directly in the folder, not in class folders"):
        from imgclf.data.scan import scan_folder

        scan_folder(loose)

    negative = flat(run_cli("train", digits_source, "--lr", "-1", "--out", tmp_path / "runs").output)
    assert negative.count("received") == 1 and "received -1.0" in negative
    huge = run_cli("train", digits_source, "--lr", "1e39", "--out", tmp_path / "runs")
    assert huge.exit_code == 2 and "float32" in flat(huge.output)  # not a raw overflow inside the optimizer

    misplaced = flat(run_cli("train", digits_source, "--set", "epochs=1", "--out", tmp_path / "runs").output)
    assert "did you mean train.epochs?" in misplaced

    model = flat(run_cli("train", digits_source, "--model", "resnet1800", "--out", tmp_path / "runs").output)
    assert "`imgclf models 'resnet*'`" in model and "import timm" not in model

    config = run_cli("config").output
    train_line = next(line for line in config.splitlines() if line.startswith("train:"))
    assert train_line.rstrip().endswith(".")  # a whole sentence, not cut off mid-way
    assert json.dumps(train_line)  # printable
