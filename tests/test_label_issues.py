"""Label issues on real images: Fashion-MNIST with labels flipped on purpose (seeded) is inspected and trained on;
the flipped images are what gets flagged, the report shows them, and `--exclude label_issues.csv` leaves them out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FASHION_CLASSES, FASHION_MNIST, read_idx, require_fashion_mnist, run_cli
from imgclf.data.split import ManifestRow, SplitManifest
from imgclf.evaluation.label_issues import (
    LABEL_ISSUE_COLUMNS,
    confident_joint,
    find_label_issues,
    flag,
    label_issues_wanted,
)
from imgclf.files import read_csv

PER_CLASS = 60
FLIPS = 30  # 5 % of 600


@pytest.fixture(scope="module")
def flipped(tmp_path_factory) -> tuple[Path, set[str]]:
    """600 Fashion-MNIST training images (60 per class) in a flat folder, 30 of them under a wrong class (seeded);
    returns the folder and the flipped paths."""
    require_fashion_mnist()
    images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(3)
    chosen = np.concatenate([np.flatnonzero(labels == k)[:PER_CLASS] for k in range(10)])
    given = labels[chosen].astype(int)
    wrong = set(rng.choice(len(chosen), FLIPS, replace=False).tolist())
    root = tmp_path_factory.mktemp("flipped") / "data"
    planted = set()
    for i, index in enumerate(chosen):
        if i in wrong:
            given[i] = rng.choice([k for k in range(10) if k != labels[index]])
        path = root / FASHION_CLASSES[given[i]] / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(path)
        if i in wrong:
            planted.add(str(path))
    return root, planted


def test_inspect_labels_finds_the_flipped_images(flipped, tmp_path):
    root, planted = flipped
    result = run_cli("inspect", root, "--labels", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "label_issues.csv")
    assert rows and tuple(rows[0]) == LABEL_ISSUE_COLUMNS
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores)  # likeliest first
    flagged = {str(Path(row["path"])) for row in rows}
    hits = len(flagged & {str(Path(p)) for p in planted})
    precision, recall = hits / len(flagged), hits / len(planted)
    # benchmarks/label_issues.py at 60 per class: precision 0.86-0.96, recall 0.70-0.83 over seeds
    assert precision >= 0.75 and recall >= 0.6, (precision, recall, len(flagged))
    for row in rows:
        if row["path"] in planted:  # the suggestion names the image's true class (its file name is its index)
            true = FASHION_CLASSES[read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")[int(Path(row["path"]).stem)]]
            assert row["given"] != true
    summary = json.loads((tmp_path / "out" / "dataset.json").read_text())["label_issues"]
    assert summary["flagged"] == len(rows) and summary["images"] == 600 and summary["out_of_fold_accuracy"] > 0.7
    assert (tmp_path / "out" / "label_issues.png").is_file()
    assert f"{len(rows)} likely mislabelled" in " ".join(result.output.split())


@pytest.mark.slow
def test_train_reports_label_issues_and_excludes_them_when_asked(flipped, tmp_path):
    root, planted = flipped
    flags = ["--set", "model.width=8", "--epochs", "1", "--out", tmp_path, "--set", "data.img_size=28"]
    result = run_cli("train", root, *flags, "--name", "looked")  # 600 images: data.label_issues auto looks
    assert result.exit_code == 0, result.output
    run = tmp_path / "looked"
    rows = read_csv(run / "label_issues.csv")
    assert len({row["path"] for row in rows} & planted) >= 0.6 * FLIPS
    assert {row["split"] for row in rows} <= {"train", "val", "test"}
    assert json.loads((run / "label_issues.json").read_text())["flagged"] == len(rows)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "### Label issues" in markdown and f"**{len(rows)}** of 600 images are likely mislabelled" in markdown
    assert f"--exclude {run / 'label_issues.csv'}" in markdown
    assert 'id="fig-label_issues"' in (run / "report.html").read_text(encoding="utf-8")

    flags += ["--set", "data.label_issues=false", "--no-report"]
    again = run_cli("train", root, *flags, "--name", "cleaned", "--exclude", run / "label_issues.csv")
    assert again.exit_code == 0, again.output
    kept = {str(row.path) for row in SplitManifest.load(tmp_path / "cleaned" / "manifest.csv").rows}
    assert len(kept) == 600 - len(rows) and not kept & {row["path"] for row in rows}
    assert not (tmp_path / "cleaned" / "label_issues.csv").exists()  # data.label_issues: false does not look


def test_a_class_too_small_to_fold_is_said_not_guessed(tmp_path):
    rows = [ManifestRow(tmp_path / f"{i}.png", "a" if i < 10 else "b", "train", str(i)) for i in range(13)]
    found = find_label_issues(rows, max_pixels=10**8)
    assert found.issues == () and found.skipped == "not looked for: classes with fewer than 5 images (b)"
    assert found.summary()["skipped"] == found.skipped


def test_flagged_images_are_confidently_another_class():
    probs = np.array([[0.995, 0.005], [0.002, 0.998], [0.6, 0.4], [0.3, 0.7], [0.999, 0.001]])
    labels = np.array([0, 0, 1, 1, 1])
    assert flag(probs, labels).tolist() == [False, True, False, False, True]  # own label at most 1 %, argmax other
    off, joint = confident_joint(probs, labels)
    assert joint.sum(axis=1).tolist() == [2.0, 3.0]  # calibrated to the given counts
    assert off[1] and off[4] and not off[0]


def test_auto_looks_at_datasets_of_a_useful_size():
    assert not label_issues_wanted("auto", 499) and label_issues_wanted("auto", 500)
    assert label_issues_wanted("auto", 10_000) and not label_issues_wanted("auto", 10_001)
    assert label_issues_wanted(True, 20) and not label_issues_wanted(False, 5_000)
