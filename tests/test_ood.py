"""'I don't know' on real images: a model trained on Fashion-MNIST scores scikit-learn's digits as unlike its training
data, the threshold chosen on validation travels in the bundle and the ONNX metadata, `predict --abstain` answers
`unknown` exactly above it, the server says the same, and the report shows accuracy against coverage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import imgclf
from conftest import run_cli, write_fashion_mnist
from imgclf.evaluation.ood import OodThreshold, auroc, choose_threshold, energy, selective_accuracy
from imgclf.files import read_csv
from test_serve import free_port, wait_ready


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> Path:
    """small_cnn trained a few epochs on 1,000 Fashion-MNIST images (val 300, test 200), exported to ONNX."""
    root = tmp_path_factory.mktemp("ood")
    data = write_fashion_mnist(root / "data", train=100, val=30, test=20)
    config = {"train": {"epochs": 4}, "model": {"width": 16}, "data": {"label_issues": False}}
    run = imgclf.train(data, config, out=root / "runs", name="fashion").run_dir
    imgclf.export(run)
    return run


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """300 of scikit-learn's 8x8 digits, upscaled to 28 px grayscale: inputs the fashion model never saw."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits-ood") / "digits"
    folder.mkdir()
    digits = load_digits()
    for index, image in enumerate(digits.images[:300]):
        pixels = np.rint(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28), Image.BILINEAR).save(folder / f"{index:03d}.png")
    return folder


def scores_of(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([float(row["ood_score"]) for row in rows])


def test_digits_score_as_unknown_to_a_fashion_model_and_abstain_follows_the_threshold(
    fashion_run, digits_folder, tmp_path
):
    model_json = json.loads((fashion_run / "model" / "model.json").read_text())
    threshold = OodThreshold.from_dict(model_json["ood"])
    assert threshold is not None and threshold.coverage == 0.95 and threshold.images == 300
    metrics = json.loads((fashion_run / "metrics.json").read_text())
    assert metrics["ood"]["threshold"] == pytest.approx(threshold.threshold)

    inside = scores_of(read_csv(fashion_run / "predictions.csv"))  # the run's own test images
    out = tmp_path / "digits.csv"
    assert run_cli("predict", fashion_run, digits_folder, "--out", out).exit_code == 0
    outside = scores_of(read_csv(out))
    assert auroc(inside, outside) >= 0.9  # benchmarks/ood.py, fully trained: 0.99

    mixed = tmp_path / "mixed.csv"
    test_images = sorted((fashion_run.parent.parent / "data" / "test").rglob("*.png"))[:60]
    result = run_cli("predict", fashion_run, digits_folder, *test_images, "--abstain", "--out", mixed)
    assert result.exit_code == 0, result.output
    rows = read_csv(mixed)
    for row in rows:
        unknown = float(row["ood_score"]) > threshold.threshold
        assert (row["label"] == "unknown") == unknown, row
        assert row["class_1"] != "unknown"  # the classes are still there to read
    digits_unknown = np.mean([row["label"] == "unknown" for row in rows if "digits" in row["path"]])
    fashion_unknown = np.mean([row["label"] == "unknown" for row in rows if "digits" not in row["path"]])
    assert digits_unknown >= 0.5 and fashion_unknown <= 0.3, (digits_unknown, fashion_unknown)

    plain = run_cli("predict", fashion_run, digits_folder, "--out", tmp_path / "plain.csv")
    assert plain.exit_code == 0 and all(r["label"] != "unknown" for r in read_csv(tmp_path / "plain.csv"))


def test_the_onnx_model_carries_the_threshold_and_gives_the_same_scores(fashion_run, digits_folder, tmp_path):
    import onnx

    onnx_file = fashion_run / "model" / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    stored = json.loads(meta["imgclf"])["ood"]
    assert stored == json.loads((fashion_run / "model" / "model.json").read_text())["ood"]
    eager, exported = tmp_path / "eager.csv", tmp_path / "onnx.csv"
    assert run_cli("predict", fashion_run, digits_folder, "--abstain", "--out", eager).exit_code == 0
    assert run_cli("predict", onnx_file, digits_folder, "--abstain", "--out", exported).exit_code == 0
    np.testing.assert_allclose(scores_of(read_csv(eager)), scores_of(read_csv(exported)), atol=2e-3)
    assert [r["label"] for r in read_csv(eager)] == [r["label"] for r in read_csv(exported)] or (
        np.abs(scores_of(read_csv(eager)) - stored["threshold"]).min() < 2e-3  # a score on the line may flip
    )


def test_the_server_returns_the_score_and_abstains_when_asked(fashion_run, digits_folder, tmp_path):
    images = sorted(digits_folder.iterdir())[:3] + sorted((fashion_run.parent.parent / "data" / "test").rglob("*"))[:3]
    images = [path for path in images if path.is_file()]
    expected = tmp_path / "cli.csv"
    assert run_cli("predict", fashion_run, *images, "--abstain", "--out", expected).exit_code == 0
    by_name = {Path(row["path"]).name: row for row in read_csv(expected)}

    port = free_port()
    command = [sys.executable, "-m", "imgclf", "serve", fashion_run / "model" / "model.onnx", "--port", port]
    process = subprocess.Popen(
        [str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        files = [("files", (path.name, path.read_bytes(), "image/png")) for path in images[:4]]
        asked = httpx.post(f"{url}/predict?abstain=true", files=files, timeout=60).json()
        plain = httpx.post(f"{url}/predict", files=files, timeout=60).json()
        metadata = httpx.get(f"{url}/metadata", timeout=30).json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert asked["ood_threshold"] == pytest.approx(metadata["ood"]["threshold"])
    for item, free in zip(asked["predictions"], plain["predictions"]):
        row = by_name[item["filename"]]
        assert item["ood_score"] == pytest.approx(float(row["ood_score"]), abs=2e-3)
        assert item["unknown"] == (item["ood_score"] > asked["ood_threshold"])
        assert item["label"] == ("unknown" if item["unknown"] else item["classes"][0])
        assert free["label"] == free["classes"][0] and free["ood_score"] == item["ood_score"]


def test_the_report_shows_accuracy_against_coverage(fashion_run):
    html = (fashion_run / "report.html").read_text(encoding="utf-8")
    assert 'id="fig-selective"' in html
    assert "`imgclf predict --abstain` says 'unknown'" in (fashion_run / "report.md").read_text(encoding="utf-8")


def test_energy_threshold_and_the_selective_curve():
    assert energy(np.array([[10.0, 0.0], [0.1, 0.0]])).round(2).tolist() == [-10.0, -0.74]
    chosen = choose_threshold(np.arange(100.0), 0.95)
    assert chosen.threshold == pytest.approx(94.05) and chosen.images == 100
    assert OodThreshold.from_dict(chosen.to_dict()) == chosen and OodThreshold.from_dict(None) is None
    with pytest.raises(ValueError, match="at least one finite score"):
        choose_threshold(np.array([np.nan]), 0.9)
    correct = np.array([1, 1, 1, 0, 0])  # the wrong ones are the unusual ones
    curve = selective_accuracy(correct, np.array([0.1, 0.2, 0.3, 0.9, 0.8]), points=5)
    assert curve["coverage"].tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert curve["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.75, 0.6]
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
