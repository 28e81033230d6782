"""The diagnosis, advice and records on the small real datasets where learners start: scikit-image's 200 LFW
face/non-face images and 400 Fashion-MNIST images, default settings, 3 epochs."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import imgclf
from conftest import FASHION_CLASSES, FASHION_MNIST, read_idx, require_fashion_mnist, run_cli
from imgclf.evaluation.diagnose import gap_noise, loss_noise, read_history
from imgclf.evaluation.plots import learning_curves_figure
from imgclf.files import read_csv
from imgclf.flags import FLAGS

CONFIG_KEYS = {flag.spelling: tuple(flag.key.split(".")) for flag in FLAGS}  # the one flag table


def write_lfw(folder: Path) -> Path:
    """scikit-image's lfw_subset(): 100 faces and 100 non-faces, 25x25 gray, as a flat class folder."""
    from skimage.data import lfw_subset

    for index, image in enumerate(lfw_subset()):
        target = folder / ("face" if index < 100 else "nonface") / f"{index:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(target)
    return folder


def write_fashion_400(folder: Path) -> Path:
    require_fashion_mnist()
    images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    for label, name in enumerate(FASHION_CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(labels == label)[:40]:
            Image.fromarray(images[index]).save(folder / name / f"{index:05d}.png")
    return folder


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory) -> dict[str, Path]:
    """The two datasets, each trained with the defaults for 3 epochs, report included."""
    root = tmp_path_factory.mktemp("teacher")
    runs = {}
    for name, write in (("lfw", write_lfw), ("fashion", write_fashion_400)):
        data = write(root / name)
        runs[name] = imgclf.train(data, {"train": {"epochs": 3}}, out=root / "runs", name=name).run_dir
    return runs


def flags_in(text: str) -> list[tuple[str, str]]:
    """(flag, value) pairs of the commands in a step; a bare boolean flag (`--pretrained`) has no value."""
    return re.findall(r"(--[a-z-]+) (?!--)([^\s`]+)", text)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lfw", "fashion"])
def test_small_real_runs_get_a_diagnosis_within_their_evidence(small_runs, name):
    run = small_runs[name]
    report = imgclf.report(run)
    verdicts = report.verdicts
    kinds = [v.kind for v in verdicts]
    assert read_csv(run / "duplicates.csv") == []
    assert "leakage" not in kinds  # no identical files, and a test-above-val gap of a few images is noise
    history = read_history(run / "history.csv")
    assert all(row["steps"] >= 10 for row in history)  # batch auto: 10+ steps per epoch
    assert "few_steps" not in kinds
    if "overfitting" in kinds:  # only with evidence beyond the noise, recomputed here from the history
        last, best = history[-1], min(history, key=lambda row: row["val_loss"])
        gap = last["train_acc"] - last["val_acc"]
        gap_beyond = gap > gap_noise(last["train_acc"], last["train_images"], last["val_acc"], last["val_images"])
        rise_noise = loss_noise(best["val_loss_se"], last["val_loss_se"])
        rise_beyond = rise_noise is not None and last["val_loss"] - best["val_loss"] > rise_noise
        assert gap_beyond or rise_beyond, (verdicts[0].evidence, history)
    config = yaml.safe_load((run / "config.yaml").read_text())
    for verdict in verdicts:
        for step in verdict.next_steps:
            for flag, value in flags_in(step):
                if flag in CONFIG_KEYS:
                    current = config
                    for part in CONFIG_KEYS[flag]:
                        current = current[part]
                    assert str(yaml.safe_load(value)) != str(current), step  # never a no-op
                    # "(now 64)" after one flag; "(now --model small_cnn, --freeze-epochs 0)" after several
                    now = step.rpartition("(now ")[2] if "(now " in step else ""
                    assert f"(now {current})" in step or f"{flag} {current}" in now or flag == "--batch-size", step


@pytest.mark.slow
def test_a_large_batch_on_a_small_set_is_warned_and_not_judged(tmp_path, caplog):
    data = write_lfw(tmp_path / "lfw")
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        run = imgclf.train(data, {"train": {"epochs": 3, "batch_size": 64}}, out=tmp_path / "runs", name="b64").run_dir
    assert any("optimizer steps per epoch" in r.getMessage() for r in caplog.records)
    verdicts = imgclf.report(run).verdicts
    assert [v.kind for v in verdicts][:2] == ["too_early", "few_steps"]
    assert any("--batch-size 16` (now 64)" in step for step in verdicts[1].next_steps)
    assert "Fewer than 10 steps per epoch" in (run / "report.md").read_text()


@pytest.mark.slow
def test_an_image_duplicated_across_train_and_test_is_named(tmp_path):
    flat = write_lfw(tmp_path / "flat")
    data = tmp_path / "split"
    for label in ("face", "nonface"):
        files = sorted((flat / label).glob("*.png"))
        for split, chosen in (("train", files[:70]), ("val", files[70:85]), ("test", files[85:])):
            (data / split / label).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, data / split / label / path.name)
    shutil.copy(data / "train" / "face" / "000.png", data / "test" / "face" / "copy-of-000.png")
    run = imgclf.train(data, {"train": {"epochs": 3}}, out=tmp_path / "runs", name="leak").run_dir
    leakage = next(v for v in imgclf.report(run).verdicts if v.kind == "leakage")
    assert leakage.title == "Leakage: 1 identical image across splits"
    assert "000.png (train)" in leakage.evidence[0] and "copy-of-000.png (test)" in leakage.evidence[0]


@pytest.mark.slow
def test_calibration_on_a_tiny_val_split_is_refused_and_said(small_runs, tmp_path):
    run = Path(shutil.copytree(small_runs["lfw"], tmp_path / "run"))
    result = run_cli("evaluate", run, "--calibrate")
    assert result.exit_code == 0, result.output
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["n"] == 20 and calibration["kept"] is False
    assert "fewer than 100" in calibration["refused_because"]
    assert json.loads((run / "model" / "model.json").read_text())["calibration"]["temperature"] == 1.0
    assert "calibration refused" in " ".join(result.output.split())
    imgclf.report(run)
    assert "temperature refused (fitted on 20 validation images" in (run / "report.md").read_text()
    forced = run_cli("evaluate", run, "--calibrate", "--force-calibration")
    assert forced.exit_code == 0
    assert json.loads((run / "calibration.json").read_text())["kept"] is True


@pytest.mark.slow
def test_the_loss_curves_compare_like_with_like_under_label_smoothing(small_runs):
    run = small_runs["fashion"]
    history = read_history(run / "history.csv")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["label_smoothing"] == 0.1
    for row in history:  # both recorded: the objective (with smoothing) is above the plain cross-entropy
        assert row["train_ce"] < row["train_loss"]
        assert row["val_loss_se"] > 0 and row["val_images"] == 40
    figure = learning_curves_figure(history)
    loss_axes = figure.axes[0]
    lines = {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in loss_axes.get_lines()}
    np.testing.assert_allclose(lines["training"], [row["train_ce"] for row in history])
    np.testing.assert_allclose(lines["validation"], [row["val_loss"] for row in history])
    assert "training objective (not comparable)" in lines
    text = (run / "report.md").read_text()
    assert "label smoothing 0.1" in text and "not comparable" in text
    assert "its target for the true class was 0.910" in text  # why ECE is positive under smoothing
    assert "mean confidence" in text


@pytest.mark.slow
def test_every_command_in_the_report_runs_as_printed(small_runs, monkeypatch):
    for run in small_runs.values():
        monkeypatch.chdir(run.parent.parent)  # where the report was built from: its paths are relative to here
        imgclf.report(run)
        commands = {
            span for span in re.findall(r"`([^`]+)`", (run / "report.md").read_text()) if span.startswith("imgclf ")
        }
        assert len(commands) >= 3
        for command in sorted(commands):
            tokens = shlex.split(command)
            result = run_cli(*tokens[1:], "--help")  # parses every option, then prints the command's help
            assert result.exit_code == 0, f"{command}: {result.output}"
            for token in tokens[2:]:
                if not token.startswith("-") and "/" in token and "=" not in token:
                    assert Path(token).exists(), f"{command}: {token} does not exist from here"
