"""Tracking sinks: callbacks that copy what a run records into the tools teams already run (MLflow, TensorBoard).

A sink is a `Callback` (Keras' `TensorBoard`, Lightning's loggers): it reads what the loop already records (the
history row of each epoch, the run folder's files at the end) and never changes training. Tracking is a side
channel, so a sink must never stop or slow a run:
- a sink whose package is missing is a usage error before training starts (it says which extra to install);
- MLflow's calls run on one background thread, in order, so training never waits for a server; an unreachable
  server is found by a 2-second probe at the start, and then, like any failing call, warns once and the run goes
  on without it; at the end the sink waits at most `FLUSH_SECONDS` for what is still queued.

The config's `tracking.callbacks` adds callbacks by import path ('package.module:name'), for sinks of other tools.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imgclf.config import TrackingConfig
from imgclf.errors import ConfigError
from imgclf.files import read_csv, write_json_atomic
from imgclf.tracking.runs import flatten, read_json
from imgclf.training.state import Callback, FitState, RunInfo

__all__ = ["MLflowSink", "TensorBoardSink", "load_callback", "tracking_callbacks"]

log = logging.getLogger(__name__)

FLUSH_SECONDS = 30.0  # at the end of a run, the longest wait for queued MLflow calls
PROBE_SECONDS = 2.0  # how long the start-of-run probe waits for a tracking server to answer
# history columns sent as metrics each epoch (the rest are counts and sizes)
EPOCH_METRICS = ("train_loss", "train_ce", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s")
# run-folder files logged as artifacts at the end, when they exist
ARTIFACTS = (
    "report.html",
    "report.md",
    "metrics.json",
    "confusion_matrix.png",
    "confusion_matrix.csv",
    "config.yaml",
    "history.csv",
    "calibration.json",
)
MLFLOW_RECORD = "mlflow.json"  # in the run folder: the MLflow run a resumed session continues


def tracking_callbacks(settings: TrackingConfig, root: Path) -> list[Callback]:
    """The callbacks `settings` ask for: the MLflow and TensorBoard sinks, then `settings.callbacks` imported.

    Raises:
        ConfigError: a sink's package is not installed, or an import path does not name a callback.
    """
    sinks: list[Callback] = []
    if settings.mlflow:
        sinks.append(MLflowSink(settings.mlflow_uri, settings.mlflow_experiment))
    if settings.tensorboard:
        sinks.append(TensorBoardSink(Path(root) / "tensorboard"))
    sinks += [load_callback(path) for path in settings.callbacks]
    return sinks


def load_callback(path: str) -> Callback:
    """Import 'package.module:name' and call it with no arguments (a Callback class or a factory).

    Example:
        >>> load_callback("imgclf.training.state:Callback")  # a sink of your own: "my_project.tracking:WandbSink"
        <imgclf.training.state.Callback object at ...>
    """
    module_name, _, name = path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"tracking.callbacks: cannot import '{path}' ({exc})") from None
    callback = target()
    hooks = ("on_run_start", "on_run_end", "on_fit_start", "on_epoch_end", "on_fit_end", "on_interrupt")
    missing = [hook for hook in hooks if not callable(getattr(callback, hook, None))]
    if missing:
        raise ConfigError(
            f"tracking.callbacks: '{path}' gave a {type(callback).__name__}, which lacks {', '.join(missing)}; "
            "subclass imgclf.training.state.Callback"
        )
    return callback


class _Background:
    """One daemon thread that runs a sink's calls in order. The first call that fails warns once and every later
    call is dropped, so a broken server costs one warning, not one per epoch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failed = False
        self.jobs: queue.Queue[Callable[[], None] | threading.Event | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name=f"imgclf-{name}", daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        if not self.failed:
            self.jobs.put(job)

    def fail(self, why: str) -> None:
        if not self.failed:
            self.failed = True
            log.warning("%s: %s; the run goes on without it", self.name, why)

    def close(self, timeout: float) -> None:
        """Run what is queued, waiting at most `timeout` seconds; then let the thread end."""
        done = threading.Event()
        self.jobs.put(done)
        if not done.wait(timeout) and not self.failed:
            self.failed = True
            log.warning(
                "%s did not take the last records within %.0f s; they were not sent (the run folder has them)",
                self.name,
                timeout,
            )
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if isinstance(job, threading.Event):  # close() waits for this marker
                job.set()
            elif not self.failed:
                try:
                    job()
                except Exception as exc:  # any failure of the tracking tool: warn once, never reach training
                    first_line = str(exc).splitlines()[0] if str(exc) else ""
                    self.fail(f"{type(exc).__name__}: {first_line}")


class MLflowSink(Callback):
    """Logs a run to MLflow: params = the resolved config flattened (`train.lr`, ...), one value per epoch of the
    history's metrics with the epoch as step, the test metrics (`test_accuracy`, ...), and as artifacts the report,
    metrics, confusion matrix, config, history and the model bundle (an artifact folder `model/`, loadable with
    `imgclf.load_model` once downloaded; it is not registered as an MLflow model flavour, which would pickle
    Python code beside the safetensors weights).

    A resumed run continues the same MLflow run (its id is kept in the run folder's `mlflow.json`).

    Args:
        uri: tracking URI; None = $MLFLOW_TRACKING_URI, else MLflow's own default.
        experiment: experiment name, created when missing.
    """

    def __init__(self, uri: str | None = None, experiment: str = "imgclf") -> None:
        try:
            import mlflow  # noqa: F401  (fail here, before training, when the extra is missing)
        except ImportError:
            raise ConfigError("--mlflow needs MLflow: pip install 'imgclf[tracking]' (or pip install mlflow)") from None
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.experiment = experiment
        self.worker = _Background("MLflow")
        self.client: Any = None
        self.run_id: str | None = None

    def on_run_start(self, run: RunInfo) -> None:
        if self.uri and self.uri.startswith(("http://", "https://")):
            problem = _unreachable(self.uri)
            if problem:
                self.worker.fail(f"the tracking server {self.uri} cannot be reached ({problem})")
                return
        self.worker.submit(lambda: self._start(run))

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        epoch, when = int(row["epoch"]), int(time.time() * 1000)
        values = {key: float(row[key]) for key in EPOCH_METRICS if _finite(row.get(key))}
        self.worker.submit(lambda: self._metrics(values, step=epoch, when=when))

    def on_run_end(self, run: RunInfo, metrics: Mapping[str, Any] | None, status: str) -> None:
        finals = {f"test_{key}": float(value) for key, value in (metrics or {}).items() if _finite(value)}
        self.worker.submit(lambda: self._finish(run, finals, status))
        self.worker.close(FLUSH_SECONDS)

    # --- on the background thread ---

    def _start(self, run: RunInfo) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(self.uri)
        record_path = run.root / MLFLOW_RECORD
        record = read_json(record_path) if run.resumed else {}
        if record.get("run_id") and record.get("tracking_uri") == self.client.tracking_uri:
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment)
        created = self.client.create_run(
            experiment_id, run_name=run.root.name, tags={"imgclf.run_dir": str(run.root.resolve())}
        )
        self.run_id = created.info.run_id
        write_json_atomic(
            record_path,
            {"tracking_uri": self.client.tracking_uri, "experiment_id": experiment_id, "run_id": self.run_id},
        )
        params = [Param(key, _param_text(value)) for key, value in flatten(run.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _metrics(self, values: Mapping[str, float], *, step: int, when: int) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, when, step) for k, v in values.items()])

    def _finish(self, run: RunInfo, finals: Mapping[str, float], status: str) -> None:
        if self.run_id is None:
            return
        if finals:
            self._metrics(finals, step=0, when=int(time.time() * 1000))
        for name in ARTIFACTS:
            if (run.root / name).is_file():
                self.client.log_artifact(self.run_id, str(run.root / name))
        if (run.root / "model").is_dir():
            self.client.log_artifacts(self.run_id, str(run.root / "model"), artifact_path="model")
        mlflow_status = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


class TensorBoardSink(Callback):
    """Writes TensorBoard event files into `log_dir` (the run folder's `tensorboard/`): per epoch the losses
    (train cross-entropy and objective, val), accuracies, learning rate and speed; at the start a grid of training
    images and the config; at the end the confusion matrix image and the test metrics.

    `tensorboard --logdir runs/` shows every run that has one.
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--tensorboard needs TensorBoard: pip install 'imgclf[tracking]' (or pip install tensorboard)"
            ) from None
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self.failed = False

    def on_run_start(self, run: RunInfo) -> None:
        def start() -> None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
            self.writer.add_text("config", "```\n" + json.dumps(run.config, indent=2) + "\n```")
            grid = _sample_grid(run.root / "manifest.csv", run.config)
            if grid is not None:
                self.writer.add_image("samples/train", grid, 0, dataformats="HWC")
            self.writer.flush()

        self._guarded(start, needs_writer=False)

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        def scalars() -> None:
            step = int(row["epoch"])
            names = {
                "train_ce": "loss/train",
                "train_loss": "loss/train_objective",
                "val_loss": "loss/val",
                "train_acc": "accuracy/train",
                "val_acc": "accuracy/val",
                "lr": "lr",
                "images_per_s": "speed/images_per_s",
            }
            for key, tag in names.items():
                if _finite(row.get(key)):
                    self.writer.add_scalar(tag, float(row[key]), step)
            self.writer.flush()

        self._guarded(scalars)

    def on_run_end(self, run: RunInfo, metrics: Mapping[str, Any] | None, status: str) -> None:
        def finish() -> None:
            figure = run.root / "confusion_matrix.png"
            if figure.is_file():
                import numpy as np
                from PIL import Image

                with Image.open(figure) as image:
                    self.writer.add_image(
                        "test/confusion_matrix", np.asarray(image.convert("RGB")), 0, dataformats="HWC"
                    )
            for key, value in (metrics or {}).items():
                if _finite(value):
                    self.writer.add_scalar(f"test/{key}", float(value), 0)
            self.writer.close()

        self._guarded(finish)

    def _guarded(self, job: Callable[[], None], *, needs_writer: bool = True) -> None:
        if self.failed or (needs_writer and self.writer is None):
            return
        try:
            job()
        except Exception as exc:  # a full disk or a broken writer: warn once, never reach training
            self.failed = True
            log.warning("TensorBoard: %s: %s; the run goes on without it", type(exc).__name__, exc)


# --- helpers --------------------------------------------------------------------------------------------------


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) or value is None else str(value)
    return text[:6000]  # MLflow's limit for a param value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unreachable(uri: str) -> str | None:
    """Why an MLflow server at `uri` does not answer (its /health endpoint) within PROBE_SECONDS, or None."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS) as answer:
            answer.read()
        return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"  # it answers: older servers lack /health
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def _sample_grid(manifest: Path, config: Mapping[str, Any], per_class: int = 4, side: int = 64):
    """A HWC uint8 grid of up to 4 training images of each of the first 8 classes (rows), or None."""
    import numpy as np

    from imgclf.data.images import load_image

    rows: dict[str, list[str]] = {}
    for row in read_csv(manifest):
        if row["split"] == "train" and len(rows.get(row["label"], [])) < per_class:
            rows.setdefault(row["label"], []).append(row["path"])
    if not rows:
        return None
    max_pixels = config.get("data", {}).get("max_pixels", 50_000_000)
    tiles = []
    for label in sorted(rows)[:8]:
        line = []
        for path in rows[label] + [None] * (per_class - len(rows[label])):
            tile = np.zeros((side, side, 3), dtype=np.uint8)
            if path is not None:
                try:
                    image = load_image(Path(path), color="rgb", max_pixels=max_pixels).resize((side, side))
                    tile = np.asarray(image, dtype=np.uint8)
                except Exception:  # an unreadable image leaves a black tile: the grid is an illustration
                    pass
            line.append(tile)
        tiles.append(np.concatenate(line, axis=1))
    return np.concatenate(tiles, axis=0)
