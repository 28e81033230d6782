"""`imgclf inspect` and `imgclf preview` end to end on tiny real data: what they find, what they draw, and that
they change nothing in the data folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from conftest import file_digests, write_digits
from conftest import run_cli as run
from imgclf.files import read_csv


def non_blank(path) -> bool:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64).std() > 5


def test_inspect_reports_counts_problems_leaks_and_draws_samples(tmp_path):
    data = write_digits(tmp_path / "data", classes=(0, 1, 2), per_class=20, layout="split")
    leaked = next((data / "train" / "digit1").glob("*.png"))
    shutil.copy(leaked, data / "test" / "digit1" / "copy-of-train.png")
    (data / "train" / "digit2" / "broken.png").write_bytes(b"not a png")
    for extra in range(20):  # digit0 gets 3x the training images of the others
        source = sorted((data / "train" / "digit0").glob("*.png"))[extra % 14]
        Image.open(source).rotate(90 + extra).save(data / "train" / "digit0" / f"extra{extra}.png")
    before = file_digests(data)

    result = run("inspect", data, "--out", tmp_path / "out")

    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert summary["layout"] == "split"
    assert summary["classes"] == ["digit0", "digit1", "digit2"]
    assert summary["counts"]["train"] == {"digit0": 34, "digit1": 14, "digit2": 14}
    assert summary["imbalance_ratio"] == round(34 / 14, 3)
    assert summary["width"] == {"min": 8, "median": 8, "max": 8}
    assert summary["grayscale_fraction"] == 1.0
    assert summary["skipped_files"] == 1
    assert summary["duplicates"]["leaks_across_splits"] == 1
    problems = read_csv(tmp_path / "out" / "problems.csv")
    skipped = [row for row in problems if row["severity"] == "skipped"]
    assert [row["path"].endswith("broken.png") for row in skipped] == [True]
    assert [row["severity"] for row in problems] == ["warning", "skipped"]  # the leak, the broken file
    assert summary["errors"] == [] and summary["ready_to_train"] is True
    assert "1 identical image pair(s)" in summary["warnings"][0]
    leaks = read_csv(tmp_path / "out" / "duplicates.csv")
    assert {leaks[0]["split_a"], leaks[0]["split_b"]} == {"train", "test"}
    assert non_blank(tmp_path / "out" / "samples.png")
    flat = " ".join(result.output.split())
    assert "imbalance ratio" in flat and "leaks across splits: 1" in flat
    assert file_digests(data) == before  # only read


def test_inspect_a_missing_folder_is_an_error(tmp_path):
    result = run("inspect", tmp_path / "nope")
    assert result.exit_code == 1
    assert "nope" in result.output


def test_preview_draws_originals_and_augmented_versions(tmp_path, digits_source):
    before = file_digests(digits_source)
    target = tmp_path / "grid.png"
    result = run("preview", digits_source, "--augment", "strong", "--images", "3", "--versions", "4", "--out", target)
    assert result.exit_code == 0, result.output
    assert non_blank(target)
    light = tmp_path / "light.png"
    assert run("preview", digits_source, "--augment", "light", "--no-hflip", "--out", light).exit_code == 0
    assert non_blank(light)
    assert Image.open(target).size != Image.open(light).size  # 3 x (1 + 4) tiles against 4 x (1 + 7)
    assert file_digests(digits_source) == before


def test_preview_rejects_an_unknown_preset(tmp_path, digits_source):
    result = run("preview", digits_source, "--augment", "wild", "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "wild" in result.output
    assert not (tmp_path / "x.png").exists()
