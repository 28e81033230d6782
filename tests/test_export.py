"""Exports that prove themselves (ONNX, TorchScript, TFLite, int8) and prediction through ONNX Runtime without torch.

Each export is compared here again, independently of the export's own check: the exported file run in its
runtime against a freshly loaded eager model, on the run's images, at batch 1 and 7.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import imgclf
from conftest import run_cli, write_digits
from imgclf.data.split import SplitManifest
from imgclf.deploy.bundle import ModelBundle, load_bundle, read_model_json, rewrite_description
from imgclf.deploy.export import check_images
from imgclf.deploy.predict import Predictor
from imgclf.deploy.runtimes import LiteRtRuntime, OnnxRuntime, TorchScriptRuntime
from imgclf.files import read_csv

# The default small_cnn (width 32, 2x2 pooled head) at its default 28 px, grayscale: what `imgclf train` makes.
DEFAULT_RUN = {"augment": {"hflip": False}, "train": {"epochs": 6, "batch_size": 16}}
TIMM_RUN = {
    "model": {"name": "mobilenetv3_small_050"},  # depthwise convs, squeeze-excite, hard-swish, adaptive pool
    "data": {"img_size": 32, "color": "rgb"},
    "augment": {"preset": "none", "hflip": False},
    "train": {"epochs": 1, "batch_size": 16},
}
RUNTIMES = {"onnx": OnnxRuntime, "torchscript": TorchScriptRuntime, "tflite": LiteRtRuntime}


@pytest.fixture(scope="session")
def default_run(tmp_path_factory, digits_source) -> Path:
    out = tmp_path_factory.mktemp("export-runs")
    return imgclf.train(digits_source, DEFAULT_RUN, out=out, name="default", report=False).run_dir


@pytest.fixture(scope="session")
def timm_run(tmp_path_factory, digits_source) -> Path:
    out = tmp_path_factory.mktemp("export-runs-timm")
    return imgclf.train(digits_source, TIMM_RUN, out=out, name="timm", report=False).run_dir


@pytest.fixture
def fresh_default_run(tmp_path, default_run) -> Path:
    """A private copy of the default run, to export into."""
    return Path(shutil.copytree(default_run, tmp_path / "run"))


def flat(text: str) -> str:
    """CLI output without the line breaks rich adds at the terminal width."""
    return " ".join(text.split())


def eager_and_exported(run: Path, exported: Path, fmt: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a freshly loaded eager model and of the exported file, on the run's check images."""
    bundle, model = load_bundle(run, "cpu")
    _, images = check_images(SplitManifest.load(run / "manifest.csv"), bundle)
    with torch.inference_mode():
        eager = model(torch.from_numpy(images)).numpy()
    runtime = RUNTIMES[fmt](exported)
    logits = np.concatenate([runtime.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    return eager, logits


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "tflite"])
@pytest.mark.parametrize("which", ["default", "timm"])
def test_exports_agree_with_eager_pytorch_at_batch_1_and_7(tmp_path, request, fmt, which):
    run = Path(shutil.copytree(request.getfixturevalue(f"{which}_run"), tmp_path / "run"))
    weights_before = hashlib.sha256((run / "model" / "weights.safetensors").read_bytes()).hexdigest()
    args = ["export", run, "--format", fmt]
    batch_sizes = [1, 7]
    if fmt == "tflite":  # a TFLite model has one batch size, fixed at export: check both, one file each
        args += ["--tflite-batch", "7"]
        batch_sizes = [7]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    suffix = {"onnx": ".onnx", "torchscript": ".ts", "tflite": ".tflite"}[fmt]
    exported = run / "model" / f"model{suffix}"
    assert exported.is_file()
    record = read_model_json(run)["exports"][fmt]
    assert record["check"]["passed"] and record["check"]["top1_agreement"] == 1.0
    assert record["check"]["batch_sizes"] == batch_sizes
    assert record["check"]["max_abs_logit_diff"] <= record["check"]["tolerance"]
    assert record["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    for batch_size in batch_sizes:
        eager, logits = eager_and_exported(run, exported, fmt, batch_size)
        assert (logits.argmax(1) == eager.argmax(1)).all()
        np.testing.assert_allclose(logits, eager, atol=1e-3 * max(1.0, np.abs(eager).max()), rtol=0)
    if fmt == "tflite" and which == "default":
        assert run_cli("export", run, "--format", "tflite").exit_code == 0  # and the batch-1 file
        eager, logits = eager_and_exported(run, exported, fmt, 1)
        assert LiteRtRuntime(exported).batch_size == 1
        np.testing.assert_allclose(logits, eager, atol=1e-3 * max(1.0, np.abs(eager).max()), rtol=0)
    assert hashlib.sha256((run / "model" / "weights.safetensors").read_bytes()).hexdigest() == weights_before
    assert not [p for p in (run / "model").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_onnx_metadata_round_trips_classes_preprocessing_and_temperature(fresh_default_run):
    run = fresh_default_run
    bundle, _ = load_bundle(run)
    rewrite_description(run / "model", replace(bundle, temperature=1.7))
    (onnx_result,) = imgclf.export(run)
    predictor = Predictor.load(onnx_result.path)
    assert predictor.runtime.name == "onnxruntime"
    assert predictor.classes == bundle.classes == ("digit0", "digit1", "digit2")
    assert predictor.bundle.temperature == pytest.approx(1.7)
    assert predictor.bundle.preprocessing == bundle.preprocessing
    assert predictor.bundle.preprocessing.img_size == 28 and predictor.bundle.preprocessing.color == "gray"
    props = OnnxRuntime(onnx_result.path).metadata()
    assert json.loads(props["classes"]) == list(bundle.classes)
    assert float(props["temperature"]) == pytest.approx(1.7)
    assert props["source_run"] == run.name
    assert props["imgclf_version"] == imgclf.__version__
    assert json.loads(props["check"])["top1_agreement"] == 1.0
    eager = Predictor.load(run, device="cpu")
    files = [Path(r["path"]) for r in read_csv(run / "manifest.csv")][:10]
    np.testing.assert_allclose(predictor.probabilities(files)[0], eager.probabilities(files)[0], atol=1e-5)


def test_torchscript_file_carries_classes_preprocessing_and_temperature(fresh_default_run):
    run = fresh_default_run
    bundle, _ = load_bundle(run)
    rewrite_description(run / "model", replace(bundle, temperature=0.8))
    (result,) = imgclf.export(run, format="torchscript")
    extra = {"imgclf.json": ""}
    torch.jit.load(str(result.path), map_location="cpu", _extra_files=extra)
    info = json.loads(extra["imgclf.json"])
    assert info["classes"] == ["digit0", "digit1", "digit2"]
    assert info["calibration"]["temperature"] == pytest.approx(0.8)
    assert ModelBundle.from_dict(info, "model.ts").classes == ("digit0", "digit1", "digit2")
    assert info["preprocessing"]["img_size"] == 28 and info["preprocessing"]["color"] == "gray"


def test_a_failed_check_leaves_no_file_and_exits_1(fresh_default_run, monkeypatch):
    """An exporter that writes a subtly different model (one weight changed) is caught and nothing is kept."""
    from imgclf.deploy import formats

    real = formats._write_onnx

    def tampered(model, sample, path):
        broken = load_bundle(fresh_default_run, "cpu")[1]
        with torch.no_grad():
            broken.head.bias[0] += 5.0
        real(broken, sample, path)

    monkeypatch.setattr(formats, "_write_onnx", tampered)
    model_json_before = (fresh_default_run / "model" / "model.json").read_bytes()
    result = run_cli("export", fresh_default_run)
    assert result.exit_code == 1
    assert "disagrees with the trained model" in flat(result.output) and "was not written" in flat(result.output)
    assert sorted(p.name for p in (fresh_default_run / "model").iterdir()) == ["model.json", "weights.safetensors"]
    assert (fresh_default_run / "model" / "model.json").read_bytes() == model_json_before


def test_int8_export_reports_accuracy_and_size_and_never_overwrites_fp32(fresh_default_run):
    run = fresh_default_run
    result = run_cli("export", run, "--int8", "--int8-max-drop", "0.2")
    assert result.exit_code == 0, result.output
    assert "accuracy" in flat(result.output) and "MB" in flat(result.output)
    fp32, int8 = run / "model" / "model.onnx", run / "model" / "model.int8.onnx"
    record = read_model_json(run)["exports"]["onnx-int8"]
    quantization = record["quantization"]
    assert quantization["method"].startswith("static QDQ")
    assert quantization["int8_bytes"] == int8.stat().st_size < fp32.stat().st_size == quantization["fp32_bytes"]
    assert quantization["accuracy_split"] == "test"
    assert quantization["fp32_accuracy"] - quantization["int8_accuracy"] <= 0.2
    predictor = Predictor.load(int8)
    assert predictor.classes == ("digit0", "digit1", "digit2")
    # the int8 file may not be written over the fp32 one, whatever --out says
    refused = run_cli("export", run, "--int8", "--out", int8)
    assert refused.exit_code == 2 and "never over it" in flat(refused.output)


def test_int8_that_loses_too_much_accuracy_is_not_kept(fresh_default_run):
    """A drop limit no model can meet (below zero): the int8 file is refused, the checked fp32 file stays."""
    from imgclf.errors import ExportCheckFailed

    with pytest.raises(ExportCheckFailed, match="was not written"):
        imgclf.export(fresh_default_run, int8=True, max_accuracy_drop=-1.0)
    model = fresh_default_run / "model"
    assert not (model / "model.int8.onnx").exists() and (model / "model.onnx").is_file()
    assert set(read_model_json(model)["exports"]) == {"onnx"}
    assert not [p for p in model.iterdir() if p.name.startswith(".")]


def test_tflite_without_the_extra_names_it(fresh_default_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import fails as if not installed
    result = run_cli("export", fresh_default_run, "--format", "tflite")
    assert result.exit_code == 2
    assert "pip install 'imgclf[tflite]'" in flat(result.output)


def test_export_usage_errors(fresh_default_run, tmp_path):
    assert run_cli("export", fresh_default_run, "--format", "pt").exit_code == 2
    assert run_cli("export", fresh_default_run, "--format", "tflite", "--int8").exit_code == 2
    missing = run_cli("export", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "not an imgclf run folder" in flat(missing.output)


# --- predict with the .onnx ---------------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Real digits plus a corrupt PNG, a hidden file and a text file named .jpg."""
    folder = write_digits(tmp_path / "photos", classes=(0, 1, 2), per_class=8)
    (folder / "digit0" / "broken.png").write_bytes((folder / "digit0" / "0000.png").read_bytes()[:40])
    (folder / "digit1" / ".hidden.png").write_bytes((folder / "digit1" / "0001.png").read_bytes())
    (folder / "digit2" / "notes.jpg").write_text("not a picture", encoding="utf-8")
    return folder


def test_predict_with_the_run_and_with_its_onnx_agree_on_every_image(fresh_default_run, messy_folder, tmp_path):
    assert run_cli("export", fresh_default_run).exit_code == 0
    onnx_file = fresh_default_run / "model" / "model.onnx"
    for model, name in ((fresh_default_run, "eager.csv"), (onnx_file, "onnx.csv")):
        result = run_cli("predict", model, messy_folder, "--out", tmp_path / name, "--top-k", "2")
        assert result.exit_code == 0, result.output
        assert "2 file(s) could not be read" in flat(result.output)
    eager, onnx = read_csv(tmp_path / "eager.csv"), read_csv(tmp_path / "onnx.csv")
    assert [r["path"] for r in eager] == [r["path"] for r in onnx]
    assert len(eager) == 26 and not any(".hidden" in r["path"] for r in eager)
    errors = {Path(r["path"]).name: r["error"] for r in onnx if r["error"]}
    assert set(errors) == {"broken.png", "notes.jpg"} and "not an image" in errors["notes.jpg"]
    for a, b in zip(eager, onnx):
        assert a["class_1"] == b["class_1"] and a["class_2"] == b["class_2"]
        if not a["error"]:
            assert float(a["probability_1"]) == pytest.approx(float(b["probability_1"]), abs=1e-5)


def test_predicting_with_onnx_imports_no_torch(fresh_default_run, messy_folder, tmp_path):
    assert run_cli("export", fresh_default_run).exit_code == 0
    onnx_file = fresh_default_run / "model" / "model.onnx"
    out = tmp_path / "preds.jsonl"
    code = (
        "import sys\n"
        "from imgclf.cli import app\n"
        "try:\n"
        f"    app(['predict', {str(onnx_file)!r}, {str(messy_folder)!r}, '--out', {str(out)!r}, '--format', 'jsonl'],"
        " prog_name='imgclf')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "import imgclf\n"
        "assert imgclf.load_model(sys.argv[1]).predict([sys.argv[2]])[0].label\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision', 'timm')))\n"
        "assert not loaded, loaded\n"
    )
    sample = str(messy_folder / "digit1" / "0001.png")
    done = subprocess.run(
        [sys.executable, "-c", code, str(onnx_file), sample], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 26
    assert {"path", "label", "classes", "probabilities", "ood_score", "error"} == set(rows[0])
    assert all(isinstance(r["ood_score"], float) for r in rows if not r["error"])  # the bundle's OOD score, no torch
    assert sum(1 for r in rows if r["error"]) == 2


def test_predict_format_is_checked_before_any_work(default_run, messy_folder, tmp_path):
    result = run_cli("predict", default_run, messy_folder, "--out", tmp_path / "p.xml", "--format", "xml")
    assert result.exit_code == 2 and "csv, jsonl" in flat(result.output)
    assert not (tmp_path / "p.xml").exists()


def test_an_onnx_file_without_imgclf_metadata_is_a_clear_error(tmp_path, fresh_default_run):
    import onnx

    assert run_cli("export", fresh_default_run).exit_code == 0
    model = onnx.load(str(fresh_default_run / "model" / "model.onnx"))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    result = run_cli("predict", bare, fresh_default_run / "manifest.csv")
    assert result.exit_code == 1 and "no 'imgclf' metadata" in flat(result.output)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx")
    result = run_cli("predict", garbage, fresh_default_run / "manifest.csv")
    assert result.exit_code == 1 and "cannot load" in flat(result.output)
