"""Reliability: bad data during training, non-finite losses, graceful stops, crash-safe writes, determinism."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import imgclf
from conftest import FAST, write_digits
from imgclf.errors import DataError, ImgclfError, TrainingDiverged, TrainingInterrupted
from imgclf.files import read_csv, write_atomic, write_bytes_atomic
from imgclf.training.checkpoint import load_checkpoint

COLUMNS = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def rows(history):
    return [[row[c] for c in COLUMNS] for row in history]


def weights(run: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(run / "model" / "weights.safetensors")).items()}


# --- a loss that stops being a number ---------------------------------------------------------------------------


def test_a_diverging_run_stops_with_advice_and_keeps_finite_checkpoints(tmp_path, digits_source):
    config = {
        **FAST,
        "train": {
            "epochs": 3,
            "optimizer": "sgd",
            "lr": 1e12,
            "scheduler": "none",
            "label_smoothing": 0.0,
            "batch_size": 8,
        },
    }
    with pytest.raises(TrainingDiverged, match=r"lower --lr"):
        imgclf.train(digits_source, config, out=tmp_path, name="boom", report=False)
    for checkpoint in (tmp_path / "boom" / "checkpoints").glob("*.safetensors"):
        state = load_checkpoint(checkpoint).model
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# --- graceful stop and exact mid-epoch resume --------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_a_stop_mid_epoch_resumes_to_the_same_weights(tmp_path, digits_source, monkeypatch, cache):
    config = {
        **FAST,
        "data": {"img_size": 16, "cache": cache, "num_workers": 0},
        "train": {"epochs": 3, "batch_size": 8},
    }
    straight = imgclf.train(digits_source, config, out=tmp_path, name="straight", report=False)

    from imgclf.training import callbacks

    calls = {"n": 0}

    def stop_at_batch_13(self):
        calls["n"] += 1
        if calls["n"] == 13:  # epoch 2, batch 4
            self.signal_number = signal.SIGINT
        return signal.Signals(self.signal_number).name if self.signal_number else None

    monkeypatch.setattr(callbacks.GracefulStop, "requested", stop_at_batch_13)
    with pytest.raises(TrainingInterrupted, match="SIGINT: stopped in epoch 2 after batch 4") as stopped:
        imgclf.train(digits_source, config, out=tmp_path, name="cut", report=False)
    assert stopped.value.exit_code == 130
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors").meta["progress"]["step"] == 4

    resumed = imgclf.train(None, resume=tmp_path / "cut", report=False)
    assert rows(resumed.history) == rows(straight.history)
    a, b = weights(straight.run_dir), weights(resumed.run_dir)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _start_training(tmp_path: Path, data: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "imgclf",
        "train",
        str(data),
        "--img-size",
        "16",
        "--batch-size",
        "4",
        "--epochs",
        "200",
        "--set",
        "model.width=8",
        "--out",
        str(tmp_path),
        "--name",
        "run",
        *extra,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_epochs(history: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if history.exists() and len(read_csv(history)) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"training ended early: {process.stderr.read()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail("training did not reach the expected epoch in time")


def _process_tree_gone(marker: str) -> bool:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return marker not in listing


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "workers"), [(signal.SIGINT, 130, "0"), (signal.SIGTERM, 143, "2"), (signal.SIGINT, 130, "2")]
)
def test_signals_stop_after_the_batch_with_a_checkpoint_and_no_leftover_workers(
    tmp_path, digits_source, sig, code, workers
):
    process = _start_training(tmp_path, digits_source, "--workers", workers, "--set", "data.cache=off")
    _wait_for_epochs(tmp_path / "run" / "history.csv", 1, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert "--resume" in " ".join(stderr.split())
    meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta
    assert meta["epoch"] >= 1
    time.sleep(0.5)
    assert _process_tree_gone(str(tmp_path)), "a DataLoader worker outlived the run"


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_without_breaking_checkpoints(tmp_path, digits_source):
    process = _start_training(tmp_path, digits_source)
    _wait_for_epochs(tmp_path / "run" / "history.csv", 1, process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("*.safetensors"):
        load_checkpoint(checkpoint)  # complete, loadable


# --- images that break during training ------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_an_image_removed_after_the_scan_is_skipped_and_counted(tmp_path, monkeypatch, caplog, cache):
    data = write_digits(tmp_path / "data", per_class=20)
    victim = sorted((data / "digit1").iterdir())[0]
    import imgclf.workflow as workflow

    original = workflow._prepare

    def prepare_then_delete(*args, **kwargs):
        prepared = original(*args, **kwargs)
        victim.unlink()  # gone between the scan and training
        return prepared

    monkeypatch.setattr(workflow, "_prepare", prepare_then_delete)
    config = {**FAST, "data": {"img_size": 16, "cache": cache}, "train": {"epochs": 2, "batch_size": 8}}
    result = imgclf.train(data, config, out=tmp_path / "runs", report=False)
    assert f"skipped {victim}" in caplog.text or str(victim) in caplog.text
    assert result.metrics is not None


def test_too_many_broken_images_stop_the_run_with_exit_1(tmp_path, monkeypatch):
    data = write_digits(tmp_path / "data", per_class=20)
    import imgclf.workflow as workflow

    original = workflow._prepare

    def prepare_then_break(*args, **kwargs):
        prepared = original(*args, **kwargs)
        for path in sorted(data.glob("digit2/*.png"))[:6]:
            path.write_bytes(b"no longer an image")
        return prepared

    monkeypatch.setattr(workflow, "_prepare", prepare_then_break)
    config = {
        **FAST,
        "data": {"img_size": 16, "cache": "off", "max_bad_images": 2},
        "train": {"epochs": 2, "batch_size": 8},
    }
    with pytest.raises(DataError, match=r"failed to load during training.*--resume") as failure:
        imgclf.train(data, config, out=tmp_path / "runs", name="r", report=False)
    assert failure.value.exit_code == 1
    assert (tmp_path / "runs" / "r" / "checkpoints" / "last.safetensors").is_file()


# --- crash-safe writes ----------------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old complete content")

    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ImgclfError, match=f"no space left writing {target}"):
        write_atomic(target, full_disk)
    assert target.read_text() == "old complete content"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary file left behind"


def test_artifacts_get_normal_permissions(tmp_path):
    write_bytes_atomic(tmp_path / "a.csv", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o666 & ~umask


_WRITER = """
import sys, torch
from torch import nn
from imgclf.training.checkpoint import save_checkpoint
model = nn.Linear(1000, 1000)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
print("ready", flush=True)
i = 0
while True:
    i += 1
    with torch.no_grad():
        model.weight.fill_(i)
    save_checkpoint(sys.argv[1], model=model, optimizer=optimizer, schedule_state={}, meta={"i": i})
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.safetensors"
    for delay in (0.7, 1.3, 2.1):
        process = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        process.stdout.readline()
        time.sleep(delay)
        process.kill()
        process.wait()
        checkpoint = load_checkpoint(path)
        assert torch.all(checkpoint.model["weight"] == checkpoint.meta["i"])


# --- determinism ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cache", "workers"), [("memory", 0), ("off", 0), ("off", 2)])
def test_the_same_seed_gives_the_same_history_and_another_seed_does_not(tmp_path, digits_source, cache, workers):
    def run(seed: int, name: str):
        config = {
            **FAST,
            "data": {"img_size": 16, "cache": cache, "num_workers": workers},
            "train": {"epochs": 2, "batch_size": 8, "seed": seed},
        }
        return imgclf.train(digits_source, config, out=tmp_path, name=name, report=False).history

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    assert rows(first) == rows(again)
    assert rows(first) != rows(other)


# --- more bad input ------------------------------------------------------------------------------------------


def test_corrupt_exif_loads_with_a_warning(tmp_path, caplog):
    from PIL import Image

    from imgclf.data.images import load_image

    path = tmp_path / "bad-exif.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(
        buffer, "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff"
    )
    path.write_bytes(buffer.getvalue())
    image = load_image(path, color="rgb")
    assert image.size == (16, 16)
    assert image.getpixel((8, 8))[0] > 150  # the pixels are there
    assert f"{path}: unreadable EXIF ignored" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_reported(tmp_path, digits_flat):
    from imgclf.data.scan import scan_folder

    locked = sorted((digits_flat / "digit0").iterdir())[0]
    locked.chmod(0)
    try:
        index = scan_folder(digits_flat)
    finally:
        locked.chmod(0o644)
    assert [p.path for p in index.problems] == [locked]
    assert "cannot read" in index.problems[0].reason


def test_a_pickled_payload_in_a_checkpoint_is_refused_and_nothing_runs(tmp_path, digits_source):
    run = imgclf.train(digits_source, {**FAST, "train": {"epochs": 2}}, out=tmp_path, name="r", report=False).run_dir
    sentinel = tmp_path / "pwned"
    import pickle

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    (run / "checkpoints" / "last.safetensors").write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(ImgclfError, match=r"corrupted checkpoint .*last\.safetensors.*best\.safetensors"):
        imgclf.train(None, resume=run, epochs=3, report=False)
    assert not sentinel.exists()


def test_gpu_out_of_memory_names_the_batch_size(tmp_path, digits_source, monkeypatch):
    import imgclf.training.engine as engine

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "fit", out_of_memory)
    with pytest.raises(ImgclfError, match=r"--batch-size 8 .*try --batch-size 4"):
        imgclf.train(digits_source, {**FAST, "train": {"epochs": 1, "batch_size": 8}}, out=tmp_path, report=False)


def test_broken_images_are_skipped_inside_worker_processes_too(tmp_path, monkeypatch, caplog):
    data = write_digits(tmp_path / "data", per_class=20)
    victim = sorted((data / "digit0").iterdir())[3]
    import imgclf.workflow as workflow

    original = workflow._prepare

    def prepare_then_break(*args, **kwargs):
        prepared = original(*args, **kwargs)
        victim.write_bytes(b"garbage")
        return prepared

    monkeypatch.setattr(workflow, "_prepare", prepare_then_break)
    config = {**FAST, "data": {"img_size": 16, "cache": "off", "num_workers": 2}, "train": {"epochs": 1}}
    imgclf.train(data, config, out=tmp_path / "runs", report=False)
    assert f"skipped {victim}" in caplog.text
