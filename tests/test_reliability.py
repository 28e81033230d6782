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


def epoch_end_weights(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """The model's state after every finished epoch, recorded by the last callback (EpochLog), which runs after
    the Checkpointer has written that epoch."""
    from imgclf.training import callbacks

    seen: dict[int, dict[str, torch.Tensor]] = {}
    original = callbacks.EpochLog.on_epoch_end

    def record(self, state, row):
        seen[state.epoch] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        original(self, state, row)

    monkeypatch.setattr(callbacks.EpochLog, "on_epoch_end", record)
    return seen


def assert_checkpoints_hold(run: Path, seen: dict[int, dict[str, torch.Tensor]], last_epoch: int) -> None:
    """last holds epoch `last_epoch` and best its best epoch, bit for bit as the model was then, all finite."""
    last = load_checkpoint(run / "checkpoints" / "last.safetensors")
    best = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert last.meta["epoch"] == last_epoch
    assert best.meta["epoch"] == last.meta["best_epoch"] <= last_epoch
    for checkpoint in (last, best):
        expected = seen[checkpoint.meta["epoch"]]
        assert set(checkpoint.model) == set(expected)
        assert all(torch.equal(checkpoint.model[k], expected[k]) for k in expected)
        assert all(torch.isfinite(t).all() for t in checkpoint.model.values() if t.is_floating_point())


# The first epoch trains the head at lr 0.01 (the "frozen" phase) and is checkpointed; the fine-tune phase's LR
# then breaks the run in epoch 2: at 1e12 the training loss becomes NaN within a few batches; at 3e38 a single
# step (one batch of 72 images per epoch) leaves weights of ~1e38, finite, whose validation loss is NaN.
@pytest.mark.parametrize(
    ("finetune_lr", "batch_size", "message"),
    [(1e12, 8, r"the training loss became nan at batch \d+"), (3e38, 72, r"the validation loss became nan in epoch 2")],
    ids=["training-loss", "validation-loss"],
)
def test_a_diverging_run_stops_with_advice_and_keeps_finite_checkpoints(
    tmp_path, digits_source, monkeypatch, finetune_lr, batch_size, message
):
    config = {
        **FAST,
        "train": {
            "epochs": 3,
            "freeze_epochs": 1,
            "optimizer": "sgd",
            "lr": 0.01,
            "finetune_lr": finetune_lr,
            "scheduler": "none",
            "label_smoothing": 0.0,
            "batch_size": batch_size,
        },
    }
    seen = epoch_end_weights(monkeypatch)
    with pytest.raises(TrainingDiverged, match=message + r".*lower --lr"):
        imgclf.train(digits_source, config, out=tmp_path, name="boom", report=False)
    assert set(seen) == {1}, "the run must checkpoint a good epoch before it diverges"
    assert_checkpoints_hold(tmp_path / "boom", seen, last_epoch=1)


def test_weights_that_stop_being_finite_stop_training_and_keep_the_last_good_epoch(
    tmp_path, digits_source, monkeypatch
):
    from imgclf.training import callbacks

    seen = epoch_end_weights(monkeypatch)
    original = callbacks.HistoryCSV.on_epoch_end  # runs just before the Checkpointer

    def poison_epoch_2(self, state, row):
        original(self, state, row)
        if state.epoch == 2:
            with torch.no_grad():
                next(state.model.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(callbacks.HistoryCSV, "on_epoch_end", poison_epoch_2)
    config = {**FAST, "train": {"epochs": 3, "batch_size": 8}}
    with pytest.raises(TrainingDiverged, match=r"weights stopped being finite numbers in epoch 2.*lower --lr"):
        imgclf.train(digits_source, config, out=tmp_path, name="inf", report=False)
    assert set(seen) == {1}
    assert_checkpoints_hold(tmp_path / "inf", seen, last_epoch=1)


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
    assert meta["progress"]["step"] >= 1, "the checkpoint of a graceful stop says where in the epoch it stopped"
    # the run joins its workers before it exits (and they hold its stderr, which communicate() read to the end);
    # 2 s for the kernel to reap them on a loaded machine, instead of a fixed sleep
    deadline = time.monotonic() + 2.0
    while not _process_tree_gone(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _process_tree_gone(str(tmp_path)), "a DataLoader worker outlived the run"


# `imgclf train` whose batches of epoch 2 stay running while a file exists: the test decides when a batch may
# end, so "stop at once" (inside the batch) and "stop after the batch" leave different checkpoints, whatever the
# machine's speed.
_HELD_TRAINING = """
import sys, time
from pathlib import Path
from imgclf.training import callbacks

hold = Path(sys.argv[1])
original = callbacks.ProgressBar.on_batch_end

def held(self, state, index, loss, batch_size):
    original(self, state, index, loss, batch_size)
    if state.epoch == 1:  # epoch 2, after its optimizer step and before the stop check
        print(f"holding batch {index + 1}", file=sys.stderr, flush=True)
        while hold.exists():
            time.sleep(0.01)

callbacks.ProgressBar.on_batch_end = held
from imgclf.cli import main
sys.argv = ["imgclf", *sys.argv[2:]]
main()
"""


def _wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(encoding="utf-8", errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never saw {text!r}: {path.read_text(encoding='utf-8', errors='replace')[-2000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_without_breaking_checkpoints(tmp_path, digits_source):
    hold, log_file = tmp_path / "hold", tmp_path / "stderr.txt"
    hold.touch()
    args = ["train", digits_source, "--img-size", "16", "--batch-size", "8", "--epochs", "3", "--set", "model.width=8"]
    args += ["--no-report", "--out", tmp_path, "--name", "run"]
    with log_file.open("w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", _HELD_TRAINING, str(hold), *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            _wait_for_text(log_file, "holding batch 1", process)  # epoch 1 is checkpointed; epoch 2's batch 1 is held
            process.send_signal(signal.SIGINT)
            _wait_for_text(log_file, "stopping after the current batch", process)
            process.send_signal(signal.SIGINT)  # the batch is still held: only an immediate stop ends it
            try:
                process.wait(timeout=30)  # an immediate stop takes well under a second
            except subprocess.TimeoutExpired:  # the second SIGINT was ignored: release the batch and see
                hold.unlink()
                process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    output = log_file.read_text(encoding="utf-8")
    assert process.returncode == 130, output[-2000:]
    assert "holding batch 2" not in output, "the second SIGINT did not stop the run at once"
    assert "--resume" not in output  # the graceful stop's message: it never got there
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("*.safetensors"):
        load_checkpoint(checkpoint)  # complete, loadable
    meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta
    assert (meta["epoch"], meta["progress"]) == (1, None), "a checkpoint was written after the second SIGINT"


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
    for delay in (0.7, 1.3, 2.1):  # kill at some point of the write loop; whichever point, the file must load
        process = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        process.stdout.readline()
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:  # the first checkpoint is complete
            time.sleep(0.01)
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


def _locked_by_permissions(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions; the i/o-error case runs as root")
    path.chmod(0)


def _failing_with_an_io_error(path: Path) -> None:
    # A real kernel error, for root too: /proc/self/mem cannot be read at offset 0 (EIO), in whichever process
    # (thread or forked decoder) opens it.
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs Linux's /proc/self/mem")
    path.unlink()
    path.symlink_to("/proc/self/mem")


@pytest.mark.parametrize("make_unreadable", [_locked_by_permissions, _failing_with_an_io_error], ids=["eacces", "eio"])
def test_an_unreadable_file_is_reported(tmp_path, digits_flat, make_unreadable):
    from imgclf.data.scan import scan_folder

    locked = sorted((digits_flat / "digit0").iterdir())[0]
    make_unreadable(locked)
    try:
        index = scan_folder(digits_flat)
    finally:
        if not locked.is_symlink():
            locked.chmod(0o644)
    assert [p.path for p in index.problems] == [locked]
    assert "cannot read" in index.problems[0].reason
    assert len(index.records) == 3 * 30 - 1


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


def test_a_streamed_whitening_layer_skips_a_broken_image_and_is_the_same_for_the_same_seed(tmp_path, monkeypatch):
    """Without the cache, small_cnn's whitening layer is fitted to images decoded again (no augmentation, so no
    random draw): one broken after the scan is left out, and two runs with one seed fit the same filters."""
    import imgclf.workflow as workflow

    original = workflow._prepare
    broken = []

    def prepare_then_break(*args, **kwargs):
        prepared = original(*args, **kwargs)
        for victim in broken:
            victim.write_bytes(b"garbage")
        return prepared

    monkeypatch.setattr(workflow, "_prepare", prepare_then_break)
    config = {
        **FAST,
        "data": {"img_size": 16, "cache": "off", "num_workers": 0, "max_bad_images": 5},
        "model": {"width": 8, "whiten": True},
        "train": {"epochs": 1, "batch_size": 8},
    }
    layers = []
    for name in ("a", "b"):  # each run its own copy of the images, two of them broken after its scan
        data = write_digits(tmp_path / f"data-{name}", per_class=20)
        broken[:] = sorted((data / "digit0").iterdir())[:2]
        result = imgclf.train(data, config, out=tmp_path / name, report=False)
        layers.append(load_file(str(result.run_dir / "model" / "weights.safetensors"))["whiten.weight"])
    pixels = torch.cat((torch.eye(4), -torch.eye(4))).reshape(8, 1, 2, 2)
    assert not torch.equal(layers[0], pixels)  # fitted, not the pass-through it starts as
    assert torch.equal(layers[0], layers[1])
