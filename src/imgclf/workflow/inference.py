"""The workflows that use a trained model: `evaluate` (metrics on a split or another folder), `report` (rebuilt
from the run folder), `load_model`, `predict` (files, folders, globs; sliced over torchrun's processes), `export`
(checked files) and `serve_app` (the FastAPI app around a loaded model)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from imgclf.config import load_config
from imgclf.data.split import SplitManifest
from imgclf.errors import ConfigError, DataError
from imgclf.evaluation import evaluate as evaluation
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tracking.runs import find_run
from imgclf.training import distributed
from imgclf.workflow.results import EvalResult

__all__ = [
    "SPLIT_NAMES",
    "app_from_environment",
    "evaluate",
    "export",
    "load_model",
    "predict",
    "report",
    "serve",
    "serve_app",
]

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def evaluate(
    run: Path | str,
    *,
    data: Path | str | None = None,
    split: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    out: Path | str | None = None,
    tta: bool = False,
    calibrate: bool = False,
    force_calibration: bool = False,
    ood: bool = False,
    progress: Progress = NO_PROGRESS,
) -> EvalResult:
    """Evaluate a run's best model on its test split, or on another labelled folder.

    Args:
        run: the run folder (or its `model/` bundle, with `data`).
        data: another labelled folder to evaluate on: its `split` subfolder (default test) when it has split
            folders (a `test/` alone is fine), else all its images. Images identical (sha256) to the run's training
            images are counted and warned about: their accuracy is not a test.
        split: train | val | test of the run's manifest (or of `data`); default test. Model selection never
            looks at test.
        batch_size: images per forward pass.
        device: auto | cpu | cuda | mps.
        out: where to write metrics.json etc.; default the run folder (or `run/eval-<data>-<split>` for `data`).
        tta: average each image's probabilities with its mirror's (only for models trained with flips).
        calibrate: first fit a temperature on the run's validation split (stored in `model/`, used from then on
            by evaluate and predict; the fit and ECE before/after go to calibration.json). A temperature fitted on
            fewer than 100 val images, or one that raises val ECE, is refused (T stays 1, warned).
        force_calibration: keep the fitted temperature even then.
        ood: first choose the out-of-distribution threshold on the validation split again (`train.ood_coverage` of
            the run's config; stored in `model/`), e.g. for a run trained before imgclf stored one.
        progress: progress reporter.

    Returns:
        The metrics and the folder they were written to.
    """
    from imgclf.deploy.predict import Predictor

    if split not in (None, "train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test; received '{split}'")
    predictor = Predictor.load(Path(run), device=device)
    predictor.max_pixels = evaluation.run_max_pixels(Path(run))
    if tta:
        predictor.check_tta()  # before any work
    paths = find_run(Path(run)) if data is None or calibrate or ood else None
    if ood:
        predictor = evaluation.fit_ood_threshold(
            predictor,
            paths,
            SplitManifest.load(paths.manifest),
            coverage=load_config(paths.config).train.ood_coverage,
            batch_size=batch_size,
            progress=progress,
        )
    if calibrate:
        manifest = SplitManifest.load(paths.manifest)
        predictor = evaluation.calibrate(
            predictor, paths, manifest, batch_size=batch_size, force=force_calibration, progress=progress
        )
    if data is None:
        rows, used_split = evaluation.manifest_rows(SplitManifest.load(paths.manifest), split or "test")
        overlap, out_dir = None, Path(out) if out else paths.root
    else:
        rows, used_split, overlap, out_dir = _folder_to_evaluate(Path(run), Path(data), split, predictor, out)
    metrics = evaluation.evaluate_rows(
        predictor, rows, used_split, out_dir, batch_size=batch_size, tta=tta, overlap=overlap, progress=progress
    )
    return EvalResult(metrics=metrics, out_dir=out_dir)


def _folder_to_evaluate(run: Path, folder: Path, split: str | None, predictor, out: Path | str | None):
    """The rows of another labelled folder, the split they are, their overlap with the run's training images, and
    where their metrics go (`out`, else `run/eval-<folder>-<split>`)."""
    rows, used_split, hashes = evaluation.folder_rows(folder, split, predictor.classes, max_pixels=predictor.max_pixels)
    overlap = evaluation.training_overlap(run, hashes)
    name = folder.resolve().name
    parent = folder.resolve().parent.name
    label = f"{parent}-{name}" if name.lower() in SPLIT_NAMES else f"{name}-{used_split}"
    return rows, used_split, overlap, Path(out) if out else run / f"eval-{label}"


def report(run: Path | str, *, device: str = "cpu", progress: Progress = NO_PROGRESS):
    """Rebuild `report.html` and `report.md` of a run from its folder alone (no retraining, no checkpoints).

    Args:
        run: the run folder.
        device: where Grad-CAM runs the model.
        progress: progress reporter.

    Returns:
        A `Report` (paths of both files and the diagnosis).

    Example:
        >>> import imgclf
        >>> built = imgclf.report("runs/small_cnn-20261128-120000")
        >>> built.html, built.verdicts[0].kind  # a run of 2 epochs is too short to judge
        (PosixPath('runs/small_cnn-20261128-120000/report.html'), 'too_early')
    """
    from imgclf.device import select_device
    from imgclf.evaluation.report import build_report

    return build_report(Path(run), device=select_device(device), progress=progress)


def load_model(path: Path | str, device: str = "auto"):
    """Load a run folder or model bundle as a `Predictor` (same preprocessing as evaluation).

    Example:
        >>> import imgclf
        >>> model = imgclf.load_model("runs/small_cnn-20261128-120000")
        >>> model.predict(["a.png"])[0].label
        'digit...'
    """
    from imgclf.deploy.predict import Predictor

    return Predictor.load(Path(path), device=device)


def predict(
    model: Any,
    inputs: Iterable[str | Path],
    *,
    top_k: int = 1,
    batch_size: int = 64,
    device: str = "auto",
    tta: bool = False,
    abstain: bool = False,
    out: Path | str | None = None,
    out_format: str = "csv",
    progress: Progress = NO_PROGRESS,
) -> list:
    """Predict files, folders (recursive) or glob patterns.

    Args:
        model: a run folder, a bundle folder, an exported `.onnx` file (ONNX Runtime, no torch), or a loaded
            `Predictor`.
        inputs: files, folders or glob patterns.
        top_k: classes reported per image.
        batch_size: images per forward pass.
        device: used when `model` is a run or bundle folder.
        tta: average each image's probabilities with its mirror's (only for models trained with flips).
        abstain: label an input `unknown` when its OOD score (how unlike the training data it is) is above the
            threshold stored with the model; every prediction carries its `ood_score` either way.
        out: also write the predictions to this file (atomically), one row per input.
        out_format: csv | jsonl.
        progress: progress reporter.

    Under torchrun (`torchrun --nproc_per_node 4 -m imgclf predict ...`) each process predicts every 4th input
    (on its own GPU); rank 0 writes `out` with the rows in the single-process order, and every process returns
    them all.

    Returns:
        One `Prediction` per input file, in order; unreadable files carry an error message.

    Example:
        >>> import imgclf
        >>> onnx = "runs/small_cnn-20261128-120000/model/model.onnx"
        >>> predictions = imgclf.predict(onnx, ["photos/"], top_k=3, out="preds.csv")
        >>> len(predictions), predictions[0].source, predictions[0].label, Path("preds.csv").is_file()
        (90, 'photos/digit0/0000.png', 'digit...', True)
    """
    from imgclf.data.layout import collect_inputs
    from imgclf.deploy.predict import OUTPUT_FORMATS, Predictor, write_predictions

    if out_format not in OUTPUT_FORMATS:  # before any work
        raise ConfigError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}; received '{out_format}'")
    # under torchrun: each process predicts its slice of the inputs and rank 0 writes them all, in input order
    group = distributed.setup(device)
    if not isinstance(model, Predictor):
        predictor = Predictor.load(Path(model), device=distributed.device_for(group, device))
        predictor.max_pixels = evaluation.run_max_pixels(Path(model))
    else:
        predictor = model
    if tta:
        predictor.check_tta()
    if abstain:
        predictor.check_abstain()
    files = collect_inputs(inputs)
    if not files:
        raise DataError(f"no image files found in {', '.join(str(i) for i in inputs)}")
    mine = files[group.rank :: group.world_size]
    shown = progress if group.is_main else Progress()
    predictions = predictor.predict(mine, top_k=top_k, batch_size=batch_size, tta=tta, abstain=abstain, progress=shown)
    if group.enabled:
        slices = distributed.gather(group, predictions)
        predictions = [None] * len(files)
        for rank, part in enumerate(slices):
            predictions[rank :: group.world_size] = part
    if out is not None:
        distributed.on_main(group, lambda: write_predictions(predictions, Path(out), top_k=top_k, format=out_format))
    return predictions


def export(
    run: Path | str,
    *,
    format: str = "onnx",
    out: Path | str | None = None,
    int8: bool = False,
    tflite_batch: int = 1,
    max_accuracy_drop: float = 0.01,
    progress: Progress = NO_PROGRESS,
) -> list:
    """Export a run's model to ONNX (default), TorchScript or TFLite, checked against the eager model on the
    run's own images before it is kept (see `deploy.export`); `int8` adds an ONNX Runtime int8 model.

    Returns:
        `ExportResult`s: the fp32 file's, then the int8 file's.

    Example:
        >>> import imgclf
        >>> imgclf.export("runs/small_cnn-20261128-120000")[0].path
        PosixPath('runs/small_cnn-20261128-120000/model/model.onnx')
    """
    from imgclf.deploy.export import export_model

    return export_model(
        Path(run),
        format=format,
        out=out,
        int8=int8,
        tflite_batch=tflite_batch,
        max_accuracy_drop=max_accuracy_drop,
        progress=progress,
    )


def serve_app(
    model: Path | str,
    settings: Any = None,
    *,
    device: str = "auto",
    threads: int | None = None,
):
    """Load a model (a run folder, bundle or `.onnx` file: errors surface here, before any port is opened) and
    return the FastAPI app that serves it (`deploy.serve`). Unless `settings` say otherwise, the pixel limit
    is the run's `data.max_pixels`.

    Example:
        >>> import imgclf
        >>> import uvicorn
        >>> app = imgclf.workflow.serve_app("runs/small_cnn-20261128-120000/model/model.onnx")
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # serves until stopped  # doctest: +SKIP
    """
    from dataclasses import replace

    from imgclf.deploy.predict import Predictor
    from imgclf.deploy.serve import ServeSettings, create_app

    path = Path(model)
    if threads and device in ("auto", "cpu") and path.suffix != ".onnx":
        import torch

        torch.set_num_threads(threads)  # a PyTorch model on the CPU: this worker's share of the cores
    predictor = Predictor.load(path, device=device, threads=threads)
    settings = settings or ServeSettings()
    if settings.max_pixels is None:  # not given (a limit equal to the default is still an answer)
        settings = replace(settings, max_pixels=evaluation.run_max_pixels(path))
    predictor.max_pixels = settings.max_pixels
    return create_app(predictor, settings)


_SERVE_ENV = "IMGCLF_SERVE"  # what each worker process of `serve(workers > 1)` serves, as JSON


def serve(
    model: Path | str,
    settings: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    device: str = "auto",
    threads: int | None = None,
    access_log: bool = True,
    on_loaded: Callable[[], None] | None = None,
) -> None:
    """Serve `model` with uvicorn until SIGINT or SIGTERM (which drains: `deploy.drain`), in `workers` processes
    sharing the port. Each worker gets `threads` intra-op threads, by default its share of the usable cores (2
    workers on 2 cores: 1 each), so the workers do not oversubscribe the CPU. The model is loaded here first, so
    a model that cannot be loaded stops before any port is opened; with several workers, each loads its own
    copy, and /metrics adds up every worker's values (prometheus-client's multiprocess mode, in a temporary
    folder removed at the end). `on_loaded` is called once the model loaded, before the port opens."""
    import json
    import os
    import shutil
    import signal
    import tempfile
    from dataclasses import asdict

    import uvicorn

    from imgclf.cpus import usable_cpus
    from imgclf.deploy.serve import ServeSettings

    settings = settings or ServeSettings()
    if workers < 1:
        raise ConfigError(f"serve workers must be at least 1; received {workers}")
    threads = threads or max(1, usable_cpus() // workers)
    application = serve_app(model, settings, device=device, threads=threads)
    if on_loaded is not None:
        on_loaded()
    options = dict(host=host, port=port, log_level="info", access_log=access_log)
    options["timeout_graceful_shutdown"] = max(1, int(settings.drain_timeout_s))
    # uvicorn raises the stopping signal again once it has shut down: ignored meanwhile, a drained stop returns
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        if workers == 1:
            uvicorn.run(application, **options)
            return
        del application  # each worker loads its own copy
        spec = {"model": str(model), "settings": asdict(settings), "device": device, "threads": threads}
        metrics_dir = tempfile.mkdtemp(prefix="imgclf-metrics-")
        os.environ[_SERVE_ENV], os.environ["PROMETHEUS_MULTIPROC_DIR"] = json.dumps(spec), metrics_dir
        try:
            target = "imgclf.workflow.inference:app_from_environment"
            uvicorn.run(target, factory=True, workers=workers, **options)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            for name in (_SERVE_ENV, "PROMETHEUS_MULTIPROC_DIR"):
                os.environ.pop(name, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def app_from_environment():
    """The app of one worker process of `serve(workers > 1)`: the model and settings its parent put in
    IMGCLF_SERVE."""
    import json
    import logging
    import os

    from imgclf.deploy.serve import ServeSettings

    spec = json.loads(os.environ[_SERVE_ENV])
    package_log = logging.getLogger("imgclf")
    if not package_log.handlers:  # a fresh process: imgclf's lines (model ready, draining) next to uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
    settings = ServeSettings(**spec["settings"])
    return serve_app(spec["model"], settings, device=spec["device"], threads=spec["threads"])
