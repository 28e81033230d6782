"""The Python API end to end on tiny real data: train, resume, evaluate, predict, load_model."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

import imgclf
from conftest import FAST, file_digests, write_digits
from imgclf.data.split import SplitManifest
from imgclf.errors import ConfigError, ImgclfError
from imgclf.files import read_csv


def test_train_writes_the_run_folder_contract(trained_run: Path, digits_source: Path):
    for name in (
        "config.yaml",
        "manifest.csv",
        "problems.csv",
        "duplicates.csv",
        "env.json",
        "history.csv",
        "checkpoints/last.safetensors",
        "checkpoints/best.safetensors",
        "model/weights.safetensors",
        "model/model.json",
        "metrics.json",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "predictions.csv",
    ):
        assert (trained_run / name).is_file(), name

    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["data"]["color"] == "gray"  # resolved from the data, not "auto"
    assert config["data"]["img_size"] == 16
    assert config["train"]["epochs"] == 2

    history = read_csv(trained_run / "history.csv")
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert set(history[0]) == {
        "epoch",
        "phase",
        "train_loss",
        "train_ce",
        "train_acc",
        "val_loss",
        "val_loss_se",
        "val_acc",
        "val_images",
        "lr",
        "seconds",
        "images_per_s",
        "steps",
        "train_images",
        "img_size",
    }
    assert {row["img_size"] for row in history} == {"16"}

    model_json = json.loads((trained_run / "model/model.json").read_text())
    assert model_json["classes"] == ["digit0", "digit1", "digit2"]
    assert model_json["preprocessing"]["img_size"] == 16
    assert model_json["preprocessing"]["color"] == "gray"
    assert model_json["arch"]["name"] == "small_cnn"
    weights = load_file(str(trained_run / "model/weights.safetensors"))
    assert weights["head.weight"].shape == (3, 32 * 2 * 2)  # 32 channels, pooled to the default 2x2 grid

    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["n"] == sum(1 for row in read_csv(trained_run / "manifest.csv") if row["split"] == "test")
    assert set(metrics["per_class"]) == {"digit0", "digit1", "digit2"}
    # the run-folder table of docs/guide.md: predictions.csv has path, true, predicted, probability, correct, error,
    # ood_score and p_<class> for every class; a row is consistent with its probabilities
    predictions = read_csv(trained_run / "predictions.csv")
    assert list(predictions[0]) == [
        "path",
        "true",
        "predicted",
        "probability",
        "correct",
        "error",
        "ood_score",
        "p_digit0",
        "p_digit1",
        "p_digit2",
    ]
    assert len(predictions) == metrics["n"]
    for row in predictions:
        probabilities = {c: float(row[f"p_{c}"]) for c in ("digit0", "digit1", "digit2")}
        assert row["predicted"] == max(probabilities, key=probabilities.get)
        assert float(row["probability"]) == probabilities[row["predicted"]]
        assert row["correct"] == str(int(row["true"] == row["predicted"])) and not row["error"]
    # env.json: Python, package versions, imgclf version, the device used, seed, command line, data folder (the
    # git repository is checked in test_records.py, the pretrained weights source in test_transfer.py)
    import platform
    from importlib.metadata import version

    env = json.loads((trained_run / "env.json").read_text())
    assert env["python"] == platform.python_version()
    assert env["packages"]["torch"] == version("torch") and env["packages"]["imgclf"] == imgclf.__version__
    assert env["imgclf_version"] == imgclf.__version__
    assert env["device"] == "cpu" or env["device"].startswith(("cuda", "mps"))
    assert env["seed"] == 0
    assert env["command"] and isinstance(env["command"], list)
    assert env["data"] == str(digits_source.resolve())
    assert Image.open(trained_run / "confusion_matrix.png").size[0] > 100


def test_training_learns_the_digits(tmp_path, digits_source):
    config = {**FAST, "train": {"epochs": 6, "batch_size": 8}}
    result = imgclf.train(digits_source, config, out=tmp_path, report=False)
    assert result.metrics["accuracy"] >= 0.9
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.best_epoch is not None


@pytest.mark.parametrize(("preset", "mixed"), [("strong", True), ("standard", False)])
def test_strong_augmentation_mixes_the_targets_that_reach_the_loss(tmp_path, digits_source, monkeypatch, preset, mixed):
    import torch

    targets = []
    original = torch.nn.CrossEntropyLoss.forward  # the training loss; validation computes its own cross-entropy

    def spy(self, logits, target):
        targets.append(target.detach().clone())
        return original(self, logits, target)

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", spy)
    config = {
        **FAST,
        "augment": {"preset": preset, "hflip": False},
        "train": {"epochs": 1, "batch_size": 8, "label_smoothing": 0.0},
    }
    result = imgclf.train(digits_source, config, out=tmp_path, report=False)
    assert len(targets) == result.history[0]["steps"] == 9  # every training batch, and nothing else
    if not mixed:
        assert all(t.ndim == 1 and t.dtype == torch.long for t in targets)
        return
    # MixUp/CutMix: per-class weights that sum to 1, and images whose target shares two classes
    assert all(t.shape == (len(t), 3) and t.is_floating_point() for t in targets)
    assert all(torch.allclose(t.sum(1), torch.ones(len(t))) for t in targets)
    shared = torch.cat([((t > 0) & (t < 1)).any(1) for t in targets])
    assert shared.sum() >= len(shared) // 4, f"only {int(shared.sum())} of {len(shared)} targets are mixed"


def test_val_lacking_a_class_keeps_train_class_indices(tmp_path, caplog):
    data = write_digits(tmp_path / "data", per_class=20, layout="split")
    shutil.rmtree(data / "val" / "digit1")
    known = sorted((data / "val" / "digit2").iterdir())[0]

    result = imgclf.train(data, {**FAST, "train": {"epochs": 1}}, out=tmp_path / "runs", report=False)

    assert "val split has no images of class(es): digit1" in caplog.text
    manifest = SplitManifest.load(result.run_dir / "manifest.csv")
    assert manifest.classes == ("digit0", "digit1", "digit2")
    (row,) = [r for r in manifest.rows if r.path == known]
    assert (row.split, row.label) == ("val", "digit2")
    # If val's own class list were used, digit2 would become index 1 (digit1). Supports prove it is not.
    val = imgclf.evaluate(result.run_dir, split="val", out=tmp_path / "val-eval").metrics
    assert val["per_class"]["digit1"]["support"] == 0
    assert val["per_class"]["digit2"]["support"] == len(list((data / "val" / "digit2").iterdir()))


def test_interrupted_run_resumes_to_the_same_result(tmp_path, digits_source, monkeypatch):
    config = {**FAST, "train": {"epochs": 4, "batch_size": 8}}
    straight = imgclf.train(digits_source, config, out=tmp_path, name="straight", report=False)

    from imgclf.training import callbacks

    original = callbacks.EpochLog.on_epoch_end

    def stop_after_two(self, state, row):
        original(self, state, row)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.EpochLog, "on_epoch_end", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(digits_source, config, out=tmp_path, name="interrupted", report=False)
    monkeypatch.undo()
    assert len(read_csv(tmp_path / "interrupted" / "history.csv")) == 2

    resumed = imgclf.train(None, resume=tmp_path / "interrupted", report=False)

    assert len(resumed.history) == 4
    columns = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[row[c] for c in columns] for row in resumed.history] == [
        [row[c] for c in columns] for row in straight.history
    ]
    a = load_file(str(straight.run_dir / "model/weights.safetensors"))
    b = load_file(str(resumed.run_dir / "model/weights.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_resuming_a_finished_run_says_so(trained_run):
    with pytest.raises(ImgclfError, match="already finished"):
        imgclf.train(None, resume=trained_run, report=False)


def test_resume_with_more_epochs_extends_the_run(tmp_path, digits_source):
    first = imgclf.train(digits_source, {**FAST, "train": {"epochs": 1}}, out=tmp_path, report=False)
    extended = imgclf.train(None, resume=first.run_dir, epochs=3, report=False)
    assert [row["epoch"] for row in extended.history] == [1, 2, 3]
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["train"]["epochs"] == 3


def test_dataset_with_bad_files_trains_and_reports_them(tmp_path, digits_source):
    data = Path(shutil.copytree(digits_source, tmp_path / "data"))
    cls = data / "digit0"
    good_png = next(cls.glob("*.png"))
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (cls / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "notes.png").write_text("this is not an image", encoding="utf-8")
    (cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (data / "digit1" / ".ipynb_checkpoints").mkdir()
    shutil.copy(good_png, data / "digit1" / ".ipynb_checkpoints" / "copy.png")
    shutil.copy(good_png, cls / "really_a_png.jpg")
    before = file_digests(data)

    result = imgclf.train(data, {**FAST, "train": {"epochs": 1}}, out=tmp_path / "runs", report=False)

    problems = {Path(row["path"]).name: row["reason"] for row in read_csv(result.run_dir / "problems.csv")}
    assert set(problems) == {"truncated.jpg", "empty.jpg", "notes.png"}
    assert "empty" in problems["empty.jpg"]
    assert "not an image" in problems["notes.png"]
    assert "decode" in problems["truncated.jpg"]
    used = {Path(row["path"]).name for row in read_csv(result.run_dir / "manifest.csv")}
    assert "really_a_png.jpg" in used
    assert "copy.png" not in used
    assert file_digests(data) == before


def test_api_predictions_match_across_inputs(trained_run, digits_source):
    files = sorted(digits_source.glob("*/*.png"))[:5]
    model = imgclf.load_model(trained_run, device="cpu")
    by_path = model.predict(files, top_k=3)
    by_bytes = model.predict([f.read_bytes() for f in files], top_k=3)
    by_pil = model.predict([Image.open(f) for f in files], top_k=3)
    for a, b, c in zip(by_path, by_bytes, by_pil, strict=True):
        assert a.classes == b.classes == c.classes
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-6)
        np.testing.assert_allclose(a.probabilities, c.probabilities, rtol=1e-6)
        assert abs(sum(a.probabilities) - 1) < 1e-5  # top-3 of 3 classes


def test_forked_decoding_predicts_what_threads_predict(tmp_path, trained_run, digits_source, monkeypatch):
    from imgclf.data import parallel

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    files = [*sorted(digits_source.glob("*/*.png"))[:7], broken]
    model = imgclf.load_model(trained_run, device="cpu")
    threaded, threaded_errors = model.probabilities(files, batch_size=3)
    monkeypatch.setattr(parallel, "PROCESS_MIN_ITEMS", 1)
    forked, forked_errors = model.probabilities(files, batch_size=3)
    np.testing.assert_array_equal(forked, threaded)  # NaN in the broken file's row on both
    assert forked_errors == threaded_errors and forked_errors[-1] and not any(forked_errors[:-1])


def test_predict_reports_unreadable_files_without_stopping(tmp_path, trained_run, digits_source):
    folder = tmp_path / "inbox"
    (folder / "nested").mkdir(parents=True)
    good = sorted(digits_source.glob("digit2/*.png"))[:2]
    for f in good:
        shutil.copy(f, folder / "nested" / f.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "README.txt").write_text("not an image")

    predictions = imgclf.predict(trained_run, [folder, tmp_path / "missing.png"], top_k=2, device="cpu")

    by_name = {Path(p.source).name: p for p in predictions}
    assert set(by_name) == {"broken.png", "missing.png", *(f.name for f in good)}
    assert by_name["broken.png"].error and not by_name["broken.png"].classes
    assert by_name["missing.png"].error
    assert all(len(by_name[f.name].classes) == 2 and by_name[f.name].error is None for f in good)


def test_evaluate_on_another_folder(tmp_path, trained_run):
    other = write_digits(tmp_path / "other", classes=(1, 2), per_class=10, layout="split")
    result = imgclf.evaluate(trained_run, data=other, split="test", device="cpu")
    assert result.out_dir == trained_run / "eval-other-test"
    assert result.metrics["n"] == len(list(other.glob("test/*/*.png")))
    assert (result.out_dir / "predictions.csv").is_file()
    assert json.loads((trained_run / "metrics.json").read_text())["split"] == "test"  # the run's own is kept


def test_evaluate_refuses_classes_the_model_does_not_know(tmp_path, trained_run):
    other = write_digits(tmp_path / "other", classes=(1, 7), per_class=5)
    with pytest.raises(ImgclfError, match="digit7"):
        imgclf.evaluate(trained_run, data=other, device="cpu")


def test_unknown_model_name_fails_before_scanning(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'resnet-18'.*resnet18"):
        imgclf.train(
            tmp_path / "does-not-matter", {"model": {"name": "resnet-18"}}, out=tmp_path / "runs", report=False
        )


def test_unwritable_output_fails_before_training(tmp_path, digits_source):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ImgclfError, match="not writable"):
        imgclf.train(digits_source, FAST, out=blocker / "runs", report=False)


@pytest.mark.parametrize(
    ("optimizer", "scheduler"), [("adam", "step"), ("sgd", "plateau"), ("sgd", "none"), ("adamw", "cosine")]
)
def test_optimizers_schedules_and_class_weights_train(tmp_path, digits_source, optimizer, scheduler):
    config = {
        **FAST,
        "train": {
            "epochs": 2,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "class_weights": "auto",
            "grad_clip": 1.0,
            "step_size": 1,
            "lr": 0.05 if optimizer == "sgd" else 2e-3,
        },
    }
    result = imgclf.train(digits_source, config, out=tmp_path, report=False)
    lrs = [row["lr"] for row in result.history]
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    if scheduler == "step":
        assert lrs[1] == pytest.approx(lrs[0] * 0.1)
    if scheduler == "none":
        assert lrs == [0.05, 0.05]


def test_early_stopping_stops_and_keeps_the_best_epoch(tmp_path, digits_source):
    # lr=0 cannot improve val_loss after epoch 1 (only BatchNorm's running statistics still move it, by less than
    # min_delta), so patience 1 stops after epoch 2.
    stopping = {"patience": 1, "min_delta": 5e-2}
    config = {**FAST, "train": {"epochs": 6, "lr": 1e-12, "scheduler": "none", "early_stopping": stopping}}
    result = imgclf.train(digits_source, config, out=tmp_path, report=False)
    assert len(result.history) < 6
    assert result.stop_reason.startswith("early stopping")
    assert result.best_epoch == min(result.history, key=lambda r: r["val_loss"])["epoch"]


@pytest.mark.slow
def test_timm_model_trains_on_grayscale(tmp_path, digits_source):
    config = {**FAST, "model": {"name": "resnet10t"}, "data": {"img_size": 32}, "train": {"epochs": 1}}
    result = imgclf.train(digits_source, config, out=tmp_path, report=False)
    model_json = json.loads((result.run_dir / "model/model.json").read_text())
    assert model_json["arch"] == {"name": "resnet10t", "num_classes": 3, "in_chans": 1, "options": {"dropout": 0.0}}
    predictions = imgclf.predict(result.run_dir, [next(digits_source.glob("digit0/*.png"))], device="cpu")
    assert predictions[0].label in {"digit0", "digit1", "digit2"}


def test_exif_rotated_and_upright_files_predict_the_same(tmp_path, trained_run):
    rng = np.random.default_rng(5)
    upright = Image.fromarray(rng.integers(0, 256, (12, 20), dtype=np.uint8))
    # Orientation 6 means "rotate 90 degrees clockwise to display": store the pixels turned the other way.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    rotated, plain = imgclf.predict(
        trained_run, [tmp_path / "rotated.png", tmp_path / "upright.png"], top_k=3, device="cpu"
    )
    assert rotated.classes == plain.classes
    np.testing.assert_allclose(rotated.probabilities, plain.probabilities, rtol=1e-6)


def test_non_ascii_and_spaces_in_names_work_end_to_end(tmp_path, digits_source):
    data = tmp_path / "données brutes"
    for source in sorted(digits_source.iterdir()):
        target = data / f"{source.name} café"
        target.mkdir(parents=True)
        for index, path in enumerate(sorted(source.iterdir())):
            shutil.copy(path, target / f"ünï cödé {index}.png")
    result = imgclf.train(
        data, {**FAST, "train": {"epochs": 1, "batch_size": 8}}, out=tmp_path / "sorties", report=False
    )
    assert json.loads((result.run_dir / "model" / "model.json").read_text())["classes"][0] == "digit0 café"
    predictions = imgclf.predict(result.run_dir, [data / "digit1 café"], device="cpu")
    assert len(predictions) == 30 and all(p.error is None for p in predictions)
    assert "ünï cödé 0.png" in {Path(p.source).name for p in predictions}
