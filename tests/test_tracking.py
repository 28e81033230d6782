"""Tracking sinks against the real tools: MLflow's local store and a live `mlflow server` on loopback (read back with
MLflow's client), TensorBoard's event files (read back with TensorBoard's reader), an unreachable server, and
callbacks from the API and the config."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

import imgclf
from conftest import FAST, run_cli
from imgclf.errors import ConfigError
from imgclf.training.state import Callback

mlflow = pytest.importorskip("mlflow", reason="the tracking extra: pip install 'imgclf[tracking]'")

EPOCHS = 3
TRACKED = {**FAST, "train": {**FAST["train"], "epochs": EPOCHS}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, its own SQLite store and artifact folder; stopped at the end."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += [
        "--backend-store-uri",
        f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination",
        str(folder / "art"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 120 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def read_back(run_dir: Path):
    """The MLflow run a run folder was logged to, through MLflow's own client."""
    record = json.loads((run_dir / "mlflow.json").read_text())
    client = mlflow.MlflowClient(record["tracking_uri"])
    return client, client.get_run(record["run_id"])


def assert_logged(run_dir: Path) -> None:
    client, logged = read_back(run_dir)
    assert logged.info.status == "FINISHED" and logged.info.run_name == run_dir.name
    params = logged.data.params
    assert params["train.epochs"] == str(EPOCHS) and params["model.name"] == "small_cnn"
    assert params["data.img_size"] == "16" and params["augment.preset"] == "light"
    history = client.get_metric_history(logged.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]  # one value per epoch, the epoch as step
    rows = [float(row) for row in _column(run_dir / "history.csv", "val_acc")]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(rows, abs=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert logged.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"report.html", "metrics.json", "confusion_matrix.png", "config.yaml", "history.csv", "model"} <= artifacts
    bundle = {a.path for a in client.list_artifacts(logged.info.run_id, "model")}
    assert bundle == {"model/model.json", "model/weights.safetensors"}
    downloaded = Path(client.download_artifacts(logged.info.run_id, "model", str(run_dir.parent / "downloaded")))
    assert imgclf.load_model(downloaded).classes == ("digit0", "digit1", "digit2")


def _column(path: Path, name: str) -> list[str]:
    from imgclf.files import read_csv

    return [row[name] for row in read_csv(path)]


def test_mlflow_local_store_reads_back_params_metrics_and_artifacts(tmp_path, digits_source, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local store's artifacts go to ./mlruns (MLflow's default artifact location)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = ["--epochs", str(EPOCHS), "--img-size", "16", "--batch-size", "8", "--augment", "light", "--no-hflip"]
    result = run_cli(
        "train", digits_source, *recipe, "--set", "model.width=8", "--mlflow", "--set", f"tracking.mlflow_uri={uri}",
        "--out", tmp_path, "--name", "m",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_logged(tmp_path / "m")
    client, logged = read_back(tmp_path / "m")
    assert client.get_experiment(logged.info.experiment_id).name == "imgclf"
    assert (tmp_path / "mlruns").is_dir()


def test_mlflow_file_store(tmp_path, digits_source, monkeypatch):
    """The classic ./mlruns file store (MLflow 3.7+ keeps it behind MLFLOW_ALLOW_FILE_STORE)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    config = {**TRACKED, "tracking": {"mlflow": True, "mlflow_experiment": "files"}}
    run = imgclf.train(digits_source, config, out=tmp_path, name="f").run_dir
    assert (tmp_path / "mlruns").is_dir()
    assert_logged(run)


@pytest.mark.slow
def test_mlflow_live_server_and_a_resumed_run_continues_the_same_mlflow_run(tmp_path, digits_source, mlflow_server):
    config = {**TRACKED, "tracking": {"mlflow": True, "mlflow_uri": mlflow_server}}
    run = imgclf.train(digits_source, config, out=tmp_path, name="live").run_dir
    assert_logged(run)
    first = json.loads((run / "mlflow.json").read_text())["run_id"]
    imgclf.train(None, resume=run, epochs=EPOCHS + 1)
    client, logged = read_back(run)
    assert logged.info.run_id == first  # the same MLflow run, now with four epochs
    assert sorted(m.step for m in client.get_metric_history(first, "val_acc")) == [1, 2, 3, 4]
    assert logged.info.status == "FINISHED"


def test_an_unreachable_tracking_server_warns_once_and_costs_no_training_time(tmp_path, digits_source, caplog):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    imgclf.train(digits_source, TRACKED, out=tmp_path, name="plain", report=False)
    plain = time.perf_counter() - started
    config = {**TRACKED, "tracking": {"mlflow": True, "mlflow_uri": closed}}
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        result = imgclf.train(digits_source, config, out=tmp_path, name="unreachable", report=False)
    tracked = time.perf_counter() - started
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("imgclf.tracking")]
    assert len(warnings) == 1 and closed in warnings[0] and "goes on without it" in warnings[0], warnings
    assert result.metrics is not None and len(result.history) == EPOCHS
    assert json.loads((result.run_dir / "status.json").read_text())["status"] == "finished"
    # a 2-second probe at most, instead of MLflow's retries (minutes) in the training loop
    assert tracked < plain + 10, (plain, tracked)


def test_tensorboard_event_files_read_back_one_scalar_per_epoch_and_the_images(tmp_path, digits_source):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_cli("train", digits_source, "--tensorboard", "--epochs", "3", "--out", tmp_path, "--name", "tb")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    val = [float(v) for v in _column(tmp_path / "tb" / "history.csv", "val_acc")]
    assert [e.value for e in events.Scalars("accuracy/val")] == pytest.approx(val, abs=1e-6)
    assert set(events.Tags()["images"]) == {"samples/train", "test/confusion_matrix"}
    metrics = json.loads((tmp_path / "tb" / "metrics.json").read_text())
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(metrics["accuracy"])


# --- callbacks from the API and the config -------------------------------------------------------------------


class Recorder(Callback):
    """Records what the hooks saw; `seen` is shared so that a config-built instance can be inspected."""

    seen: ClassVar[list[tuple]] = []

    def on_run_start(self, run):
        Recorder.seen.append(("start", run.root.name, run.config["train"]["epochs"], run.classes))

    def on_epoch_end(self, state, row):
        Recorder.seen.append(("epoch", row["epoch"]))

    def on_run_end(self, run, metrics, status):
        Recorder.seen.append(("end", status, metrics["accuracy"] if metrics else None))


def test_callbacks_from_the_api_and_the_config_see_the_run_and_its_test_metrics(tmp_path, digits_source):
    Recorder.seen = []
    api = Recorder()
    config = {**FAST, "tracking": {"callbacks": ["test_tracking:Recorder"]}}
    result = imgclf.train(digits_source, config, out=tmp_path, name="cb", report=False, callbacks=[api])
    accuracy = result.metrics["accuracy"]
    expected = [("start", "cb", 2, ("digit0", "digit1", "digit2"))] * 2
    expected += [("epoch", 1)] * 2 + [("epoch", 2)] * 2 + [("end", "finished", accuracy)] * 2
    assert Recorder.seen == expected  # both instances: the config's (first) and the API's


def test_a_failing_run_ends_the_run_hooks_with_failed(tmp_path, digits_source):
    Recorder.seen = []
    diverging = {**FAST, "train": {**FAST["train"], "optimizer": "sgd", "lr": 1e12, "scheduler": "none"}}
    with pytest.raises(imgclf.ImgclfError):
        imgclf.train(digits_source, diverging, out=tmp_path, name="boom", report=False, callbacks=[Recorder()])
    assert Recorder.seen[0][0] == "start" and Recorder.seen[-1] == ("end", "failed", None)


def test_bad_callback_paths_and_missing_extras_are_usage_errors(tmp_path, digits_source, monkeypatch):
    with pytest.raises(ConfigError, match=re.escape("import paths 'package.module:name'")):
        imgclf.train(digits_source, {"tracking": {"callbacks": ["no_colon"]}}, out=tmp_path)
    with pytest.raises(ConfigError, match=re.escape("cannot import 'nowhere.at_all:Sink'")):
        imgclf.train(digits_source, {**FAST, "tracking": {"callbacks": ["nowhere.at_all:Sink"]}}, out=tmp_path)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    result = run_cli("train", digits_source, "--mlflow", "--out", tmp_path)
    assert result.exit_code == 2 and "pip install 'imgclf[tracking]'" in result.output
