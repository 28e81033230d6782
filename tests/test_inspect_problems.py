"""`imgclf inspect` lists every problem `train` would stop or warn at, with train's own messages, still writes its
files and exits 0; it splits with the ratios, seed and pixel limit `train` would use (--ratios, --seed, --config)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from conftest import run_cli as run
from conftest import write_digits
from imgclf.data.scan import scan_folder
from imgclf.errors import DataError
from imgclf.files import read_csv


def summary_of(folder):
    return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))


@pytest.fixture
def broken(tmp_path):
    """A split dataset with three things train stops at and three it warns about, all at once."""
    data = write_digits(tmp_path / "data", classes=(0, 1, 2), per_class=20, layout="split")
    (data / "train" / "empty").mkdir()
    (data / "train" / "empty" / "notes.png").write_bytes(b"not an image")  # a class folder without an image
    shutil.copytree(data / "val" / "digit2", data / "val" / "digit9")  # a val class train lacks
    shutil.copytree(data / "val", data / "valid")  # two folders name the val split
    (data / "scratch").mkdir()  # not a split folder: ignored (a warning)
    shutil.rmtree(data / "test" / "digit1")  # a class missing from test (a warning)
    return data


def test_inspect_lists_every_problem_train_stops_at_and_still_writes_its_files(tmp_path, broken):
    result = run("inspect", broken, "--out", tmp_path / "out")

    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "out")
    assert summary["ready_to_train"] is False
    errors = summary["errors"]
    assert len(errors) == 3, errors
    assert "both 'val' and 'valid' name the val split" in errors[0]
    assert "class folder(s) with no readable image: empty" in errors[1]
    assert "val split has class(es) not in train: digit9" in errors[2]
    warnings = " | ".join(summary["warnings"])
    assert "folders scratch are not train/val/test" in warnings
    assert "test split has no images of class(es): digit1" in warnings
    assert "3 identical image pair(s) across splits or labels" in warnings  # digit9 is a copy of digit2
    assert summary["classes"] == ["digit0", "digit1", "digit2"]  # what train uses once the empty folder is gone
    assert summary["counts"]["val"]["digit9"] == 3

    rows = read_csv(tmp_path / "out" / "problems.csv")
    assert [row["severity"] for row in rows] == ["error"] * 3 + ["warning"] * 3 + ["skipped"]
    assert rows[0]["path"] == str(broken / "valid")
    assert rows[-1]["path"] == str(broken / "train" / "empty" / "notes.png")
    for name in ("samples.png", "duplicates.csv"):
        assert (tmp_path / "out" / name).is_file()

    flat = " ".join(result.output.split())
    assert "error: val split has class(es) not in train: digit9" in flat
    assert "train would stop: 3 error(s)" in flat

    # train stops at the first of them, with the same message
    trained = run("train", broken, "--out", tmp_path / "runs")
    assert trained.exit_code == 1
    assert errors[0] in " ".join(trained.output.split())


def test_the_library_scan_still_raises_the_first_problem(broken):
    collected = scan_folder(broken, collect_errors=True).errors
    with pytest.raises(DataError) as raised:
        scan_folder(broken)
    assert str(raised.value) == collected[0].reason
    assert len(collected) == 3


def test_a_flat_folder_of_loose_images_is_an_error_listed_not_a_crash(tmp_path, digits_source):
    data = tmp_path / "loose"
    data.mkdir()
    for path in sorted(digits_source.glob("*/*.png"))[:6]:
        shutil.copy(path, data / f"{path.parent.name}-{path.name}")

    result = run("inspect", data, "--out", tmp_path / "out")

    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "out")
    assert summary["ready_to_train"] is False
    assert "no training images" in summary["errors"][0]
    assert summary["skipped_files"] == 6  # each "not inside a class folder"
    assert (tmp_path / "out" / "samples.png").is_file()

    strict = run("inspect", data, "--out", tmp_path / "strict", "--strict")
    assert strict.exit_code == 1
    assert summary_of(tmp_path / "strict")["errors"] == summary["errors"]  # files written all the same


def test_a_missing_folder_exits_1_and_writes_nothing(tmp_path):
    result = run("inspect", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "dataset folder not found" in result.output
    assert not (tmp_path / "out").exists()


def test_no_validation_share_is_the_error_train_would_raise(tmp_path, digits_source):
    result = run("inspect", digits_source, "--out", tmp_path / "out", "--ratios", "0.9", "0", "0.1")

    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "out")
    assert summary["split_ratios"] == [0.9, 0.0, 0.1]
    assert summary["counts"]["val"] == {}
    (error,) = summary["errors"]
    assert error.startswith("no validation images")

    trained = run("train", digits_source, "--out", tmp_path / "runs", "--set", "data.split_ratios=[0.9,0,0.1]")
    assert trained.exit_code == 1
    assert error in " ".join(trained.output.split())


def test_inspect_splits_as_train_does_with_the_same_config(tmp_path, digits_source):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "data:\n  split_ratios: [0.6, 0.2, 0.2]\n  split_seed: 7\n  img_size: 16\nmodel:\n  width: 8\n"
        "train:\n  epochs: 1\n  batch_size: 8\n",
        encoding="utf-8",
    )
    inspected = run("inspect", digits_source, "--out", tmp_path / "out", "--config", recipe)
    assert inspected.exit_code == 0, inspected.output
    summary = summary_of(tmp_path / "out")
    assert (summary["split_ratios"], summary["split_seed"]) == ([0.6, 0.2, 0.2], 7)

    trained = run("train", digits_source, "--config", recipe, "--out", tmp_path / "runs", "--name", "r", "--no-report")
    assert trained.exit_code == 0, trained.output
    manifest = read_csv(tmp_path / "runs" / "r" / "manifest.csv")
    for split in ("train", "val", "test"):
        labels = [row["label"] for row in manifest if row["split"] == split]
        assert summary["counts"][split] == {name: labels.count(name) for name in sorted(set(labels))}

    # flags win over the file, as for train
    overridden = run(
        "inspect", digits_source, "--out", tmp_path / "o2", "--config", recipe, "--ratios", "0.8", "0.2", "0"
    )
    assert overridden.exit_code == 0, overridden.output
    summary = summary_of(tmp_path / "o2")
    assert summary["split_ratios"] == [0.8, 0.2, 0.0] and summary["split_seed"] == 7
    assert any(w.startswith("no test images") for w in summary["warnings"])


def test_inspect_uses_the_configs_pixel_limit(tmp_path):
    data = write_digits(tmp_path / "data", classes=(0, 1), per_class=6)
    Image.new("L", (20, 20), 128).save(data / "digit0" / "big.png")  # 400 pixels
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  max_pixels: 100\n", encoding="utf-8")

    assert run("inspect", data, "--out", tmp_path / "default").exit_code == 0
    assert summary_of(tmp_path / "default")["skipped_files"] == 0
    assert run("inspect", data, "--out", tmp_path / "limited", "--config", recipe).exit_code == 0
    limited = summary_of(tmp_path / "limited")
    assert limited["skipped_files"] == 1 and limited["max_pixels"] == 100
    (row,) = [r for r in read_csv(tmp_path / "limited" / "problems.csv") if r["severity"] == "skipped"]
    assert row["path"].endswith("big.png")


def test_a_bad_config_is_a_usage_error(tmp_path, digits_source):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  split_ratios: [0.5, 0.5, 0.5]\n", encoding="utf-8")
    result = run("inspect", digits_source, "--out", tmp_path / "out", "--config", recipe)
    assert result.exit_code == 2
    assert "sum to 1" in " ".join(result.output.split())
