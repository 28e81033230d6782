"""Aids to start small and a friendly first contact: `--subset`, `--fast-dev-run`, `imgclf init`, and the hints
a newcomer gets for the usual first mistakes."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

import imgclf
from conftest import FAST, run_cli, write_digits
from imgclf.files import read_csv


def flat(text: str) -> str:
    return " ".join(text.split())


def count_decodes(monkeypatch) -> list[Path]:
    """The paths the scan decodes from now on (each image's check), in a list that grows as it goes."""
    import imgclf.data.scan as scan

    decoded: list[Path] = []
    original = scan._check_job

    def counting(jobs, index, **kwargs):
        decoded.append(jobs[index][2])
        return original(jobs, index, **kwargs)

    monkeypatch.setattr(scan, "_check_job", counting)
    return decoded


# --- start small ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_subset_trains_on_exactly_n_images_per_class_and_split(tmp_path, layout, monkeypatch):
    data = write_digits(tmp_path / "data", per_class=30, layout=layout)
    decoded = count_decodes(monkeypatch)
    result = run_cli(
        "train",
        data,
        "--subset",
        "4",
        "--epochs",
        "1",
        "--no-report",
        "--out",
        tmp_path / "runs",
        "--name",
        "s",
        "--img-size",
        "16",
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "s"
    counts = Counter((row["split"], row["label"]) for row in read_csv(run / "manifest.csv"))
    assert set(counts.values()) == {4} and len(counts) == 3 * 3  # 4 per class in each of the 3 splits
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["subset"] == 4
    assert len(decoded) == 36  # the other images were never decoded


@pytest.mark.parametrize("command", ["inspect", "lr-find"])
def test_inspect_and_lr_find_take_the_same_subset_and_decode_only_it(tmp_path, command, monkeypatch):
    data = write_digits(tmp_path / "data", per_class=30, layout="split")
    decoded = count_decodes(monkeypatch)
    extra = ["--img-size", "16", "--steps", "10", "--batch-size", "4"] if command == "lr-find" else []
    result = run_cli(command, data, "--subset", "4", "--out", tmp_path / "out", *extra)
    assert result.exit_code == 0, result.output
    assert len(decoded) == 36  # 4 per class in each of the 3 splits; the other 234 images were never decoded
    if command == "inspect":
        counts = json.loads((tmp_path / "out" / "dataset.json").read_text())["counts"]
        assert all(n == 4 for split in counts.values() for n in split.values()), counts
    else:
        assert (tmp_path / "out" / "lr_find.csv").is_file()


def test_subset_draws_the_same_images_for_the_same_seed(tmp_path):
    data = write_digits(tmp_path / "data", per_class=30)
    paths = []
    for name in ("a", "b"):
        config = {**FAST, "data": {**FAST["data"], "subset": 3}, "train": {**FAST["train"], "epochs": 1}}
        run = imgclf.train(data, config, out=tmp_path / "runs", name=name, report=False).run_dir
        paths.append(sorted(row["path"] for row in read_csv(run / "manifest.csv")))
    assert paths[0] == paths[1]


@pytest.mark.slow
def test_fast_dev_run_goes_through_the_whole_pipeline_in_seconds(tmp_path, digits_source):
    started = time.monotonic()
    result = run_cli("train", digits_source, "--fast-dev-run", "--out", tmp_path / "runs")
    seconds = time.monotonic() - started
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()  # no runs/latest: a dev run is never the newest real run
    assert run.name.startswith("fast-dev-run-small_cnn-")
    history = read_csv(run / "history.csv")
    assert len(history) == 1 and history[0]["steps"] == "2"
    for name in ("metrics.json", "predictions.csv", "report.html", "report.md", "model/model.onnx"):
        assert (run / name).is_file(), name
    assert json.loads((run / "env.json").read_text())["fast_dev_run"] is True
    assert "A fast dev run" in (run / "report.md").read_text()
    assert seconds < 60, f"--fast-dev-run took {seconds:.0f} s"  # the bound; ~12 s on 2 cores here


# --- imgclf init ----------------------------------------------------------------------------------------------


def test_init_makes_the_lab_layout_with_every_class_in_every_split(tmp_path, digits_source):
    result = run_cli("init", tmp_path / "lab", "--from", digits_source)
    assert result.exit_code == 0, result.output
    lab = tmp_path / "lab"
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (lab / "data" / split).iterdir()) == ["digit0", "digit1", "digit2"]
        assert all(any((lab / "data" / split / c).iterdir()) for c in ("digit0", "digit1", "digit2"))
    assert (lab / "models").is_dir()
    readme = (lab / "README.md").read_text()
    assert "imgclf train data --out models" in readme and "models/" in readme
    notebook = json.loads((lab / "notebooks" / "Lab10_image_classification.ipynb").read_text())
    parameters = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(parameters["source"])
    assert f"DATA = {str((lab / 'data').resolve())!r}" in source
    assert f"RUNS = {str((lab / 'models').resolve())!r}" in source
    again = run_cli("init", lab, "--from", digits_source)
    assert again.exit_code == 1 and "is not empty" in flat(again.output)
    # hard links by default: the same files (inodes) as the source, nothing copied
    sources = {p.stat().st_ino for p in digits_source.rglob("*.png")}
    placed = list((lab / "data").rglob("*.png"))
    assert len(placed) == len(sources) and {p.stat().st_ino for p in placed} == sources


def test_init_splits_with_the_given_ratios_and_copies_on_request(tmp_path, digits_source):
    lab = tmp_path / "lab"
    result = run_cli("init", lab, "--from", digits_source, "--ratios", "0.5", "0.25", "0.25", "--copy")
    assert result.exit_code == 0, result.output
    per_class = len(list((digits_source / "digit0").iterdir()))
    counts = {split: len(list((lab / "data" / split / "digit0").iterdir())) for split in ("train", "val", "test")}
    # half, a quarter, a quarter (within the split's rounding); the default 0.8/0.1/0.1 would give 24/3/3
    assert sum(counts.values()) == per_class, counts
    assert abs(counts["train"] - per_class / 2) <= 1 and all(
        abs(counts[s] - per_class / 4) <= 1 for s in ("val", "test")
    )
    sources = {p.stat().st_ino for p in digits_source.rglob("*.png")}
    assert not sources & {p.stat().st_ino for p in (lab / "data").rglob("*.png")}


def test_the_packaged_notebook_is_the_repositorys(tmp_path):
    from importlib import resources

    packaged = resources.files("imgclf.lab").joinpath("Lab10_image_classification.ipynb").read_bytes()
    committed = (Path(__file__).parent.parent / "notebooks" / "Lab10_image_classification.ipynb").read_bytes()
    assert packaged == committed, "copy notebooks/Lab10_image_classification.ipynb to src/imgclf/lab/"


# --- a friendly first contact ---------------------------------------------------------------------------------


def test_imgclf_alone_prints_a_getting_started_text():
    result = run_cli()
    assert result.exit_code == 0
    assert "Getting started" in result.output and "imgclf demo" in result.output and "--fast-dev-run" in result.output


def test_a_folder_of_images_without_class_folders_gets_a_hint(tmp_path, digits_source):
    loose = tmp_path / "loose"
    loose.mkdir()
    for path in sorted((digits_source / "digit0").iterdir())[:5]:
        shutil.copy(path, loose / path.name)
    result = run_cli("train", loose, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "holds 5 image(s) but no class folders" in flat(result.output)
    assert "folder named after it" in flat(result.output)


def test_the_train_split_instead_of_its_parent_gets_a_hint(tmp_path):
    data = write_digits(tmp_path / "data", per_class=20, layout="split")
    result = run_cli("train", data / "train", "--out", tmp_path / "runs")
    assert result.exit_code == 2
    text = flat(result.output)
    assert f"{data / 'train'} is the train split of {data}" in text and "never use test, val/" in text


def test_a_run_folder_given_as_data_gets_a_hint(tmp_path, trained_run):
    result = run_cli("train", trained_run, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert f"is a run folder, not a dataset: continue it with `imgclf train --resume {trained_run}`" in flat(
        result.output
    )


def test_an_unknown_set_key_gets_the_closest_keys(tmp_path, digits_source):
    result = run_cli("train", digits_source, "--set", "train.learning_rate=0.1", "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "unknown key 'train.learning_rate'; did you mean" in flat(result.output)
    assert "did you mean train.lr?" in flat(result.output)  # another tool's name for it


def test_split_folders_without_train_get_a_hint(tmp_path):
    data = write_digits(tmp_path / "data", per_class=20, layout="split")
    shutil.rmtree(data / "train")
    result = run_cli("train", data, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "has test, val/ but no train/" in flat(result.output)
