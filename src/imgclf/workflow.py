"""The workflows behind the public API. Each composes the layers below and nothing else:
scan -> split -> loaders -> model -> fit -> bundle -> evaluate; predict and split stand alone."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from imgclf.config import RunConfig, TrainConfig, build_config, load_config, save_config
from imgclf.data.duplicates import find_duplicates, save_duplicates, warn_about_duplicates
from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.data.preprocessing import Preprocessing
from imgclf.data.scan import ImageIndex, Problem, check_training_folder
from imgclf.data.settings import preprocessing_of, resolve_data_settings
from imgclf.data.split import (
    LinkMode,
    SplitData,
    SplitManifest,
    compare_manifests,
    materialize_split,
    scan_and_split,
)
from imgclf.errors import ConfigError, DataError, ImgclfError, TrainingInterrupted
from imgclf.evaluation import evaluate as evaluation
from imgclf.files import write_csv_atomic
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tracking.runs import (
    RunPaths,
    check_writable,
    create_run_dir,
    environment_info,
    find_run,
    read_json,
    record_status,
    write_env,
)
from imgclf.training import distributed

log = logging.getLogger(__name__)

PROBLEM_COLUMNS = ("path", "reason")
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


@dataclass(frozen=True)
class TrainResult:
    """Where the run is and how it went."""

    run_dir: Path
    metrics: dict[str, Any] | None
    history: list[dict[str, float]]
    best_epoch: int | None  # the epoch of the weights the run kept
    stop_reason: str | None
    report: Any = None  # evaluation.report.Report: report.html, report.md and the diagnosis; None with report=False
    weights: str = "raw"  # which weights it kept: raw (the model's) or ema (their moving average, train.ema)


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one split, and the folder holding metrics.json and its companions."""

    metrics: dict[str, Any]
    out_dir: Path


@dataclass(frozen=True)
class SplitResult:
    """What `split()` wrote."""

    target: Path
    counts: dict[str, int]
    problems: tuple[Problem, ...]
    duplicates: int  # identical or near-duplicate pairs across splits (a folder split by hand) or labels
    near_duplicates: int = 0  # near-duplicate pairs found (each kept in one split)


def train(
    data: Path | str | None,
    config: RunConfig | Mapping[str, Any] | None = None,
    *,
    out: Path | str = "runs",
    name: str | None = None,
    resume: Path | str | None = None,
    epochs: int | None = None,
    resume_settings: Mapping[str, Any] | None = None,
    report: bool = True,
    fast_dev_run: bool = False,
    callbacks: Sequence[Any] = (),
    evaluate_test: bool = True,
    scanned: ScannedData | None = None,
    progress: Progress = NO_PROGRESS,
) -> TrainResult:
    """Train a classifier on an image folder and evaluate it on the test split.

    Args:
        data: `root/{train,val,test}/<class>/` or `root/<class>/` (split on the fly). Not needed with `resume`.
        config: a `RunConfig` or a nested mapping like `config.yaml`; None for the defaults.
        out: folder that receives the run folder.
        name: run folder name; default `<model>-<timestamp>`.
        resume: an existing run folder to continue from its last checkpoint.
        epochs: with `resume`, a new total number of epochs (to extend a finished run).
        resume_settings: with `resume`, other settings to change, as dotted keys (`{"train.device": "cuda"}`); only
            `RESUME_SETTINGS` may change, anything else is a ConfigError naming it.
        report: write report.html and report.md into the run folder at the end (see `report`).
        fast_dev_run: check the whole pipeline in seconds, not train a model: 2 images per class and split, one
            epoch of two training batches, evaluation, report and (with ONNX Runtime installed) a checked ONNX
            export. The run folder is named `fast-dev-run-...`, env.json and the report say what it is, and
            `runs/latest` does not move to it.
        callbacks: more `training.state.Callback`s, after the built-in ones and the config's `tracking` sinks:
            the fit hooks (epoch ends with the history row, ...) and the run hooks (`on_run_end` sees the test
            metrics).
        evaluate_test: evaluate the kept model on the test split at the end (tuning trials select on validation
            only and leave the test split alone: False). Without it, metrics are None and the report has no
            test section.
        scanned: the result of `scan_data` for this folder and split settings, to reuse its scan (hashes, decode
            checks) instead of scanning again (tuning trials); ignored when the settings differ.
        progress: progress reporter (the CLI passes a rich one).

    Returns:
        The run folder, test metrics, history and best epoch.

    Example:
        >>> result = imgclf.train("data/", {"train": {"epochs": 5}})
        >>> result.metrics["accuracy"]
        0.97
    """
    if resume is not None:
        settings = {**(resume_settings or {}), "train.epochs": epochs}
        return _resume(Path(resume), settings=settings, report=report, callbacks=callbacks, progress=progress)
    if data is None:
        raise ConfigError("train needs a data folder (or --resume runs/<name>)")
    config = build_config(config)
    group = distributed.setup(config.train.device)  # under torchrun: join the other processes
    progress = progress if group.is_main else Progress()  # one process draws the bars
    if fast_dev_run:
        config = build_config(config, FAST_DEV_RUN)
        if config.train.lr == "auto":  # the LR finder's 100 steps would be most of the run
            config = build_config(config, {"train.lr": TrainConfig().lr})
    prepared = _prepare(Path(data), config, out=Path(out), scanned=scanned, progress=progress)
    config = prepared.config
    if fast_dev_run:  # two training batches
        config = build_config(config, {"train.batch_size": max(1, -(-len(prepared.manifest.split("train")) // 2))})
    # one folder, named once (by rank 0) for every process
    paths = distributed.on_main(group, lambda: create_run_dir(Path(out), name, config.model.name, dev_run=fast_dev_run))
    log.info("run folder: %s", paths.root)
    from imgclf.device import describe_device, select_device  # lazy: torch

    env = environment_info(
        device=describe_device(select_device(distributed.device_for(group, config.train.device))),
        seed=config.train.seed,
    )
    env["data"] = str(Path(data).resolve())  # what the report's next steps train on
    if fast_dev_run:
        env["fast_dev_run"] = True
    if prepared.weights is not None:
        env["pretrained_weights"] = {"source": prepared.weights.source, "not_used": list(prepared.weights.tried)}
    if group.enabled:
        env["distributed"] = _distributed_record(group, config)

    def write_records() -> None:
        _write_data_records(paths, prepared.index.problems, prepared.manifest, prepared.split)
        save_config(config, paths.config)
        write_env(paths, env)
        _look_for_label_issues(paths, config, prepared.manifest, progress=progress)

    distributed.on_main(group, write_records)
    result = _train_run(
        paths,
        config,
        prepared.manifest,
        progress=progress,
        weights=prepared.weights,
        report=report,
        callbacks=callbacks,
        evaluate_test=evaluate_test,
    )
    if fast_dev_run:
        distributed.on_main(group, lambda: _dev_run_export(paths.root, progress=progress))
    return result


def _distributed_record(group, config: RunConfig) -> dict[str, Any]:
    """What env.json says about a torchrun run: the processes, the global batch and the learning-rate policy."""
    scale = group.world_size if config.train.lr_scaling == "linear" else 1
    return {
        "world_size": group.world_size,
        "processes_per_node": group.local_world_size,
        "backend": group.backend,
        "batch_size_per_process": config.train.batch_size,
        "global_batch_size": int(config.train.batch_size) * group.world_size,
        "lr_scaling": config.train.lr_scaling,
        "lr": config.train.lr * scale if isinstance(config.train.lr, float) else config.train.lr,
    }


# What `--reproduce` may set: where the run computes and is recorded; everything else is the recorded run's.
REPRODUCE_SETTINGS = (
    "train.device",
    "data.num_workers",
    "data.cache",
    "data.cache_dir",
    "tracking.mlflow",
    "tracking.mlflow_uri",
    "tracking.mlflow_experiment",
    "tracking.tensorboard",
    "tracking.callbacks",
)


def reproduce(
    run: Path | str,
    data: Path | str | None = None,
    *,
    out: Path | str | None = None,
    name: str | None = None,
    settings: Mapping[str, Any] | None = None,
    report: bool = True,
    callbacks: Sequence[Any] = (),
    progress: Progress = NO_PROGRESS,
) -> TrainResult:
    """Train a new run with a run's resolved configuration on the same files, checked first against its manifest.

    The folder (default: the one the run trained on, from its env.json) is scanned and split with the run's data
    settings and compared with its manifest.csv by path (relative to the folder), sha256, class and split. Any
    difference refuses the run and names the files; otherwise the new run trains exactly as the old one did
    (on a CPU, to the same history) and its env.json names the run it reproduces.

    Args:
        run: the run folder to reproduce.
        data: the data folder, when it moved; default the run's.
        out: folder for the new run; default the old run's parent.
        name: the new run's folder name.
        settings: dotted keys of `REPRODUCE_SETTINGS` (where it computes and is recorded); others are refused.
        report: write the report at the end.
        callbacks: more callbacks (see `train`).
        progress: progress reporter.

    Raises:
        DataError: the folder differs from the manifest (nothing is trained); ConfigError: a refused setting.

    Example:
        >>> imgclf.reproduce("runs/small_cnn-20261128-120000").history == old_history  # up to the seconds
    """
    paths = find_run(Path(run))
    given = {key: value for key, value in (settings or {}).items() if value is not None}
    refused = sorted(set(given) - set(REPRODUCE_SETTINGS))
    if refused:
        raise ConfigError(
            f"--reproduce trains with {paths.root}'s own settings; {', '.join(refused)} would make it another run. "
            f"These may change: {', '.join(REPRODUCE_SETTINGS)}"
        )
    recorded_root = read_json(paths.env).get("data")
    if data is None and not recorded_root:
        raise ConfigError(f"{paths.env} does not say which folder {paths.root} trained on; pass the data folder")
    folder = Path(data if data is not None else recorded_root)
    config = load_config(paths.config, given)
    group = distributed.setup(config.train.device)  # under torchrun: join now, so that rank 0 alone scans
    progress = progress if group.is_main else Progress()
    scanned = scan_data(folder, config, progress=progress)
    recorded = SplitManifest.load(paths.manifest)
    difference = compare_manifests(recorded, Path(recorded_root or scanned.root), scanned.manifest, scanned.root)
    if difference:
        raise DataError(
            f"{folder} no longer holds the images {paths.root} trained on: {difference.describe()}. Nothing was "
            f"trained; restore the files, or train a new run on the folder as it is"
        )
    log.info("%s holds the %d images %s trained on, unchanged", folder, len(recorded.rows), paths.root)
    result = train(
        folder,
        config,
        out=Path(out) if out is not None else paths.root.parent,
        name=name,
        report=report,
        callbacks=callbacks,
        scanned=scanned,
        progress=progress,
    )

    def record() -> None:
        env = read_json(RunPaths(result.run_dir).env)
        write_env(RunPaths(result.run_dir), {**env, "reproduces": str(paths.root.resolve())})

    distributed.on_main(group, record)
    return result


# --fast-dev-run: the whole pipeline on a sliver of the data (the batch size is set after the scan: two batches)
FAST_DEV_RUN = {
    "data.subset": 2,
    "train.epochs": 1,
    "train.freeze_epochs": 0,
    "train.calibrate": False,
    "train.early_stopping.patience": None,
}


def _dev_run_export(run: Path, *, progress: Progress) -> None:
    """The export step of a dev run: a checked ONNX file, when ONNX's packages are installed."""
    from imgclf.deploy.export import export_model

    try:
        export_model(run, progress=progress)
    except ConfigError as exc:  # onnx / onnxruntime not installed: say so, the rest was checked
        log.warning("fast dev run: export skipped (%s)", exc)


@dataclass(frozen=True)
class ScannedData:
    """A folder scanned and split once (`scan_data`), for several runs on it (tuning trials)."""

    root: Path  # resolved
    settings: tuple  # the data settings it was split with (`_split_settings`)
    index: ImageIndex
    manifest: SplitManifest
    split: SplitData | None = None  # with the duplicates across splits and the groups


def scan_data(
    data: Path | str, config: RunConfig | Mapping[str, Any] | None = None, *, progress: Progress = NO_PROGRESS
):
    """Scan and split a dataset folder as `train` would with `config`'s data settings, once, so that several runs
    (`train(..., scanned=...)`) share the hashes and decode checks instead of repeating them.

    Raises:
        DataError: the folder is missing or train would refuse it.
    """
    settings = build_config(config).data
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (expected a folder of class folders)")
    check_training_folder(root)

    def scan() -> ScannedData:
        split = scan_and_split(
            root.resolve(),
            ratios=settings.split_ratios,
            seed=settings.split_seed,
            max_pixels=settings.max_pixels,
            subset=settings.subset,
            near_duplicates=settings.near_duplicates,
            groups=settings.groups,
            groups_csv=settings.groups_csv,
            exclude=settings.exclude,
            cache_dir=settings.cache_dir,
            progress=progress,
        )
        return ScannedData(root.resolve(), _split_settings(settings), split.index, split.manifest, split)

    # under torchrun rank 0 scans (hashing every file once) and hands the split to the others
    return distributed.on_main(distributed.current(), scan)


def _split_settings(settings) -> tuple:
    """The data settings a scan and split depend on: a `ScannedData` made with others is not reused."""
    return (
        tuple(settings.split_ratios),
        settings.split_seed,
        settings.max_pixels,
        settings.subset,
        settings.near_duplicates,
        settings.groups,
        settings.groups_csv,
        settings.exclude,
    )


def lr_find(
    data: Path | str,
    config: RunConfig | Mapping[str, Any] | None = None,
    *,
    out: Path | str = ".",
    num_steps: int = 100,
    progress: Progress = NO_PROGRESS,
):
    """Run the LR range test on the training split and write `lr_find.png` and `lr_find.csv` into `out`.

    The model trains as it would in the first epoch (pretrained weights loaded, the backbone frozen when
    `train.freeze_epochs` > 0); its weights are restored afterwards.

    Returns:
        An `LRFinderResult` (curve, suggestion, why the ramp stopped).

    Example:
        >>> imgclf.lr_find("data/", {"model": {"name": "resnet18"}}).suggestion
        0.0021
    """
    from imgclf import builders
    from imgclf.device import resolve_compute

    prepared = _prepare(Path(data), build_config(config), progress=progress)
    config, manifest = prepared.config, prepared.manifest
    compute = resolve_compute(config.train.device, config.train.precision, config.train.channels_last)
    config = _resolve_for_compute(config, compute)
    pre = preprocessing_of(config)
    loaders = builders.make_loaders(config, manifest, pre, compute, progress=progress)
    return builders.find_learning_rate(
        config,
        manifest,
        pre,
        compute,
        loaders.train,
        len(loaders.train),
        prepared.weights,
        Path(out),
        num_steps=num_steps,
        progress=progress,
    )


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
    overlap = None
    if data is None:
        rows, used_split = evaluation.manifest_rows(SplitManifest.load(paths.manifest), split or "test")
        out_dir = Path(out) if out else paths.root
    else:
        folder = Path(data)
        rows, used_split, hashes = evaluation.folder_rows(
            folder, split, predictor.classes, max_pixels=predictor.max_pixels
        )
        overlap = evaluation.training_overlap(Path(run), hashes)
        name = folder.resolve().name
        parent = folder.resolve().parent.name
        label = f"{parent}-{name}" if name.lower() in SPLIT_NAMES else f"{name}-{used_split}"
        out_dir = Path(out) if out else Path(run) / f"eval-{label}"
    metrics = evaluation.evaluate_rows(
        predictor, rows, used_split, out_dir, batch_size=batch_size, tta=tta, overlap=overlap, progress=progress
    )
    return EvalResult(metrics=metrics, out_dir=out_dir)


def report(run: Path | str, *, device: str = "cpu", progress: Progress = NO_PROGRESS):
    """Rebuild `report.html` and `report.md` of a run from its folder alone (no retraining, no checkpoints).

    Args:
        run: the run folder.
        device: where Grad-CAM runs the model.
        progress: progress reporter.

    Returns:
        A `Report` (paths of both files and the diagnosis).

    Example:
        >>> imgclf.report("runs/small_cnn-20261128-120000").verdicts[0].kind
        'good_fit'
    """
    from imgclf.device import select_device
    from imgclf.evaluation.report import build_report

    return build_report(Path(run), device=select_device(device), progress=progress)


def load_model(path: Path | str, device: str = "auto"):
    """Load a run folder or model bundle as a `Predictor` (same preprocessing as evaluation).

    Example:
        >>> model = imgclf.load_model("runs/small_cnn-20261128-120000")
        >>> model.predict(["a.png"])[0].label
        '7'
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
        >>> imgclf.predict("runs/x/model/model.onnx", ["photos/"], top_k=3, out="preds.csv")[0].label
        'cat'
    """
    from imgclf.data.scan import collect_inputs
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
        >>> uvicorn.run(imgclf.workflow.serve_app("runs/x/model/model.onnx"), host="127.0.0.1", port=8000)
    """
    from dataclasses import replace

    from imgclf.deploy.predict import Predictor
    from imgclf.deploy.serve import ServeSettings, create_app

    path = Path(model)
    predictor = Predictor.load(path, device=device, threads=threads)
    settings = settings or ServeSettings()
    if settings.max_pixels == ServeSettings.max_pixels:
        settings = replace(settings, max_pixels=evaluation.run_max_pixels(path))
    predictor.max_pixels = settings.max_pixels
    return create_app(predictor, settings)


def split(
    source: Path | str,
    target: Path | str,
    *,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    mode: LinkMode = "hardlink",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    near_duplicates: bool = True,
    groups: str | None = None,
    groups_csv: Path | str | None = None,
    progress: Progress = NO_PROGRESS,
) -> SplitResult:
    """Write a seeded, stratified train/val/test copy (hard links by default) of a flat class-folder dataset, with
    identical files, near-duplicates and groups each kept in one split.

    Args:
        source: `source/<class>/...` (a folder that is already split keeps its split).
        target: a new or empty folder; receives `{train,val,test}/<class>/` and nothing else.
        ratios: train/val/test fractions.
        seed: the same seed gives the same split.
        mode: hardlink | copy | symlink.
        max_pixels: images above this are skipped as problems.
        near_duplicates: find near-duplicates and keep them together (as `data.near_duplicates`).
        groups: a regular expression naming each image's group from its relative path (as `data.groups`).
        groups_csv: a CSV of path, group (as `data.groups_csv`).
        progress: progress reporter.

    Example:
        >>> imgclf.split("photos/", "data/", groups=r"(?P<group>patient\\d+)").counts
        {'train': 80, 'val': 10, 'test': 10}
    """
    data = build_config(
        None,
        {"data.split_ratios": list(ratios), "data.groups": groups, "data.groups_csv": groups_csv},
    ).data
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"target {target} exists and is not empty; choose a new folder (nothing was written)")
    if not Path(source).is_dir():
        raise DataError(f"dataset folder not found: {source} (expected a folder of class folders)")
    scanned = scan_and_split(
        Path(source),
        ratios=data.split_ratios,
        seed=seed,
        max_pixels=max_pixels,
        near_duplicates=near_duplicates,
        groups=data.groups,
        groups_csv=data.groups_csv,
        progress=progress,
    )
    warn_about_duplicates(scanned.duplicates)
    counts = materialize_split(scanned.manifest, target, mode=mode)
    return SplitResult(
        target=target,
        counts=counts,
        problems=scanned.index.problems,
        duplicates=len(scanned.duplicates),
        near_duplicates=len(scanned.near),
    )


# --- training internals --------------------------------------------------------------------------------------


def _train_run(
    paths: RunPaths,
    config: RunConfig,
    manifest: SplitManifest,
    *,
    progress: Progress,
    checkpoint=None,
    weights=None,
    report: bool = True,
    extend_from: int | None = None,
    callbacks: Sequence[Any] = (),
    evaluate_test: bool = True,
) -> TrainResult:
    """`_fit_run` with status.json kept true (running, then finished / stopped / failed) and the extra callbacks'
    run hooks (the config's tracking sinks, then the caller's) ended exactly once, however the run ends. Under
    torchrun the status and the sinks are rank 0's; the caller's callbacks run on every process."""
    from contextlib import nullcontext

    from imgclf.tracking.runs import StatusNote
    from imgclf.tracking.sinks import tracking_callbacks

    main = distributed.current().is_main
    sinks = tracking_callbacks(config.tracking, paths.root) if main else []
    hooks = _RunHooks([*sinks, *callbacks])
    with record_status(paths) if main else nullcontext(StatusNote()) as note:
        try:
            result = _fit_run(
                paths,
                config,
                manifest,
                hooks=hooks,
                progress=progress,
                checkpoint=checkpoint,
                weights=weights,
                report=report,
                extend_from=extend_from,
                evaluate_test=evaluate_test,
            )
        except BaseException as exc:
            hooks.end(None, "stopped" if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)) else "failed")
            raise
        note.reason = result.stop_reason or f"all {len(result.history)} epochs ran"
        hooks.end(result.metrics, "finished")
    return result


class _RunHooks:
    """The run hooks of the extra callbacks: started once the configuration is final, ended at most once."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)
        self.run = None

    def start(self, run) -> None:
        self.run = run
        for callback in self.callbacks:
            callback.on_run_start(run)

    def end(self, metrics: Mapping[str, Any] | None, status: str) -> None:
        run, self.run = self.run, None
        if run is not None:
            for callback in self.callbacks:
                callback.on_run_end(run, metrics, status)


def _fit_run(
    paths: RunPaths,
    config: RunConfig,
    manifest: SplitManifest,
    *,
    hooks: _RunHooks,
    progress: Progress,
    checkpoint=None,
    weights=None,
    report: bool = True,
    extend_from: int | None = None,
    evaluate_test: bool = True,
) -> TrainResult:
    """The recipe: loaders -> model, optimizer, phases -> callbacks -> fit -> bundle (-> temperature) -> test
    evaluation -> report."""
    import torch

    from imgclf import builders
    from imgclf.deploy.bundle import ModelBundle, save_bundle
    from imgclf.deploy.predict import Predictor
    from imgclf.deploy.runtimes import TorchRuntime
    from imgclf.device import resolve_compute
    from imgclf.training import callbacks as cb
    from imgclf.training.engine import fit
    from imgclf.training.state import RunInfo

    classes = manifest.classes
    train_cfg = config.train
    group = distributed.current()  # one process, or this one's place among torchrun's
    compute = resolve_compute(
        distributed.device_for(group, train_cfg.device),
        train_cfg.precision,
        train_cfg.channels_last,
        train_cfg.deterministic,
        processes_per_node=group.local_world_size,
    )
    resolved = _resolve_for_compute(config, compute)
    if resolved != config:  # config.yaml records what was used
        config = resolved
        distributed.on_main(group, partial(save_config, config, paths.config))
    pre = preprocessing_of(config)
    # 1. data (this process's slice of it); an LR from the LR finder (run by rank 0) when asked for
    loaders = builders.make_loaders(config, manifest, pre, compute, group=group, progress=progress)
    steps = len(loaders.train)
    if train_cfg.lr == "auto":
        found = distributed.on_main(
            group,
            lambda: builders.find_learning_rate(
                config, manifest, pre, compute, loaders.train, steps, weights, paths.root, progress=progress
            ),
        )
        config = build_config(config, {"train.lr": found.suggestion})
        distributed.on_main(group, partial(save_config, config, paths.config))
    # 2. model (pretrained weights under a new head), optimizer, loss, phases; or the saved state when resuming
    stopping = config.train.early_stopping
    monitor = cb.Monitor.resolve(stopping.monitor, stopping.mode)
    state, spec, loss_fn, phases = builders.make_fit_state(
        config, manifest, pre, steps, monitor.mode, compute, weights, extend_from=extend_from, group=group
    )
    if checkpoint is not None:
        state.restore_counters(checkpoint.meta)
        state.model.load_state_dict(checkpoint.model)
        if state.ema is not None and checkpoint.ema:
            state.ema.load(checkpoint.ema, int(checkpoint.meta.get("ema_steps", 0)))
        # the phase the checkpoint was written in: that of the epoch it stopped in, or of the last finished one
        phases.enter(state, state.epoch + 1 if state.progress is not None else max(state.epoch, 1))
        state.optimizer.load_state_dict(checkpoint.optimizer)
        state.schedule.load_state_dict(checkpoint.schedule)
        log.info("resuming after epoch %d of %d (%s phase)", state.epoch, state.epochs, state.phase)
    else:
        phases.enter(state, 1)
    # 3. everything around the step. Every process takes the decisions (phases, early stopping, the checkpoint's
    # checks: the history rows are the same on all); rank 0 alone writes and shows.
    main = group.is_main
    early = [cb.EarlyStopping(monitor, stopping.patience, stopping.min_delta)] if stopping.patience is not None else []
    budget = _time_budget(config, state, phases, steps, len(loaders.val), group)
    callbacks: list[cb.Callback] = [
        phases,
        *([budget] if budget is not None else []),
        *([cb.HistoryCSV(paths.history)] if main else []),
        *early,
        cb.Checkpointer(
            paths.checkpoints,
            monitor,
            extra_meta={"classes": list(classes), "processes": group.world_size},
            write=main,
        ),
        *([cb.EpochLog(), cb.ProgressBar(progress, steps_per_epoch=steps)] if main else []),
        *hooks.callbacks,
    ]
    hooks.start(RunInfo(paths.root, config.model_dump(mode="json"), classes, resumed=checkpoint is not None))
    log.info(
        "training %s (%s parameters) on %d images, validating on %d%s; %d classes, %dpx %s; %s, %s%s; data %s%s",
        spec.name,
        f"{sum(p.numel() for p in state.model.parameters()):,}",
        loaders.train_images,
        loaders.val_images,
        " (each process's share)" if group.enabled else "",
        len(classes),
        pre.img_size,
        pre.color,
        f"{compute.device} ({torch.get_num_threads()} threads)" if compute.device.type == "cpu" else compute.device,
        compute.precision,
        ", channels_last" if compute.channels_last else "",
        loaders.path,
        _processes_note(group, int(config.train.batch_size)),
    )
    # 4. train; the best weights are loaded back at the end. Ctrl-C or SIGTERM stop after the current batch.
    with cb.GracefulStop() as stop:

        def should_stop() -> str | None:
            return stop.requested() or getattr(loaders.train, "abort_reason", None)

        try:
            fit(
                state,
                loaders.train,
                loaders.val,
                loss_fn=loss_fn,
                compute=compute,
                seed=train_cfg.seed,
                monitor=monitor.name,
                grad_clip=train_cfg.grad_clip,
                mix=builders.mixing(config, len(classes)),
                should_stop=should_stop,
                callbacks=callbacks,
                resolution=_resolution_schedule(config, pre),
                group=group,
                step_limit=(lambda: budget.epoch_step_limit(state)) if budget is not None else None,
            )
        except torch.OutOfMemoryError as exc:
            raise _out_of_memory(exc, train_cfg.batch_size) from None
    if state.interrupted_by is not None:
        where = (
            f"stopped in epoch {state.epoch + 1} after batch {state.progress.step} of {steps}; "
            f"{paths.checkpoints / 'last.safetensors'} holds that point. Continue with: imgclf train --resume "
            f"{paths.root}"
        )
        # the signal may have reached another process only: its name, shared by all, gives the exit code
        signal_number = stop.signal_number or _signal_number(state.interrupted_by)
        if signal_number is not None:
            raise TrainingInterrupted(f"{state.interrupted_by}: {where}", signal_number)
        raise DataError(f"{state.interrupted_by}. The run {where} once the files are fixed or removed")
    kept_epoch, kept_metric = (
        (state.best_ema_epoch, state.best_ema_metric) if state.kept == "ema" else (state.best_epoch, state.best_metric)
    )
    if not main:  # rank 0 ships and evaluates the model; the other processes are done
        return TrainResult(paths.root, None, state.history, kept_epoch, state.stop_reason, None, state.kept)
    # 5. ship the best weights (the model's, or their average's when it validated better) with their preprocessing
    # (and a temperature fitted on val), evaluate once on test
    training = {"run": paths.root.name, "best_epoch": kept_epoch, monitor.name: kept_metric, "weights": state.kept}
    if state.ema is not None:
        training["ema_decay"] = config.train.ema_decay
    bundle = ModelBundle(
        spec=spec,
        classes=classes,
        preprocessing=pre,
        training=training,
        hflip_valid=config.augment.hflip,
    )
    save_bundle(paths.model, state.model, bundle)
    predictor = Predictor(bundle, TorchRuntime(state.model, compute.device), max_pixels=config.data.max_pixels)
    batch_size = 2 * config.train.batch_size
    predictor = evaluation.fit_ood_threshold(
        predictor, paths, manifest, coverage=config.train.ood_coverage, batch_size=batch_size, progress=progress
    )
    if config.train.calibrate:
        predictor = evaluation.calibrate(predictor, paths, manifest, batch_size=batch_size, progress=progress)
    metrics = None
    if evaluate_test:
        rows, used_split = evaluation.manifest_rows(manifest, "test")
        metrics = evaluation.evaluate_rows(
            predictor, rows, used_split, paths.root, batch_size=batch_size, progress=progress
        )
    built = None
    if report:
        from imgclf.evaluation.report import build_report

        built = build_report(paths.root, device=compute.device, progress=progress)
    return TrainResult(paths.root, metrics, state.history, kept_epoch, state.stop_reason, built, state.kept)


def _time_budget(config: RunConfig, state, phases, steps: int, val_batches: int, group):
    """The TimeBudget callback of a run with `train.time_budget` (None without), its cap recorded: the last
    phase's epochs (train.epochs is an upper bound)."""
    if config.train.time_budget is None:
        return None
    from imgclf.config import parse_duration
    from imgclf.training.budget import TimeBudget, budget_cap

    if state.budget is None or "cap" not in state.budget:  # a resumed run keeps its record
        budget_cap(state, phases.phases[-1].epochs * steps)
    return TimeBudget(
        parse_duration(config.train.time_budget, "train.time_budget"),
        steps_per_epoch=steps,
        val_batches=val_batches,
        warmup_epochs=config.train.warmup_epochs,
        group=group,
    )


def _resolution_schedule(config: RunConfig, pre: Preprocessing):
    """epoch -> training image size: growing from `augment.min_res` (progressive resizing), else img_size."""
    from imgclf.data.transforms import progressive_size

    augment = config.augment
    if augment.min_res is None:
        return lambda epoch: pre.img_size
    return partial(
        progressive_size,
        epochs=config.train.epochs,
        img_size=pre.img_size,
        min_res=augment.min_res,
        ramp=augment.res_ramp,
    )


def _processes_note(group, batch_size: int) -> str:
    if not group.enabled:
        return ""
    return f"; {group.world_size} processes, batch {batch_size} each ({group.world_size * batch_size} in all)"


def _signal_number(reason: str | None) -> int | None:
    """SIGINT -> 2: the number of a stop reason that names a signal (GracefulStop's reasons), else None."""
    import signal

    try:
        return int(signal.Signals[reason]) if reason else None
    except KeyError:
        return None


def _out_of_memory(exc: Exception, batch_size: int) -> ImgclfError:
    return ImgclfError(
        f"the GPU ran out of memory with --batch-size {batch_size} ({str(exc).splitlines()[0]}); try --batch-size "
        f"{max(1, batch_size // 2)}, a smaller --img-size, or --set train.precision=bf16; the last finished epoch "
        "is in checkpoints/last.safetensors (--resume)"
    )


# What `--resume` may change: where and how the rest of the run computes, how long it goes on, where it is also
# recorded. Everything else (model, data, optimisation, augmentation) would make it another run, and is refused
# (see `_resume`).
RESUME_SETTINGS = (
    "train.epochs",
    "train.early_stopping.patience",
    "train.device",
    "train.precision",
    "train.compile",
    "train.deterministic",
    "train.calibrate",
    "data.num_workers",
    "data.cache",
    "data.cache_dir",
    "tracking.mlflow",
    "tracking.mlflow_uri",
    "tracking.mlflow_experiment",
    "tracking.tensorboard",
    "tracking.callbacks",
)


def _resume(
    run_dir: Path, *, settings: Mapping[str, Any], report: bool, callbacks: Sequence[Any] = (), progress: Progress
) -> TrainResult:
    """Continue a run from `checkpoints/last.safetensors`, or train a finished one further.

    `settings` may change only `RESUME_SETTINGS`. A finished run (all its epochs, or stopped early) trained to a
    larger `train.epochs` gets an extension phase: a fresh warmup and schedule over the added epochs, at the last
    phase's peak LR. An unfinished run given another `train.epochs` has its schedule re-planned to that length.
    """
    from imgclf.training.checkpoint import load_checkpoint

    paths = find_run(run_dir)
    given = {key: value for key, value in settings.items() if value is not None}
    refused = sorted(set(given) - set(RESUME_SETTINGS))
    if refused:
        raise ConfigError(
            f"--resume continues {paths.root} with the settings it was trained with; {', '.join(refused)} would make "
            f"it another run and cannot change (start a new run for that). On resume these may change: "
            f"{', '.join(RESUME_SETTINGS)}"
        )
    previous = load_config(paths.config)
    config = load_config(paths.config, given)
    group = distributed.setup(config.train.device)  # under torchrun: join the other processes
    progress = progress if group.is_main else Progress()
    manifest = SplitManifest.load(paths.manifest)
    checkpoint = load_checkpoint(paths.checkpoints / "last.safetensors")
    saved_classes = tuple(checkpoint.meta.get("classes", manifest.classes))
    if saved_classes != manifest.classes:
        raise DataError(f"{paths.manifest} classes {manifest.classes} differ from the checkpoint's {saved_classes}")
    done, planned = int(checkpoint.meta["epoch"]), int(checkpoint.meta["epochs"])
    stop_reason = checkpoint.meta.get("stop_reason")
    processes = int(checkpoint.meta.get("processes", 1))
    if checkpoint.meta.get("progress") and processes != group.world_size:
        # each process resumes its own slice of the stopped epoch's order with its own random state
        how = f"under torchrun --nproc-per-node {processes} (or --devices {processes})" if processes > 1 else "alone"
        raise ConfigError(
            f"{paths.checkpoints / 'last.safetensors'} stopped in the middle of epoch {done + 1} with {processes} "
            f"process(es); it resumes only with {processes} (received {group.world_size}): run --resume {how}"
        )
    if config.train.time_budget is not None and (stop_reason or done >= planned):
        asked = given.get("train.epochs")  # --epochs asks for an extension: a usage error; else nothing is left
        raise (ConfigError if asked else ImgclfError)(
            f"run {paths.root} was trained to a time budget of {config.train.time_budget} and is finished with its "
            f"schedule complete ({stop_reason or f'all {planned} epochs done'}); a budgeted run is not trained "
            f"further{f' (received --epochs {asked})' if asked else ''}. Start a new run with a larger --time"
        )
    epochs = config.train.epochs
    extend_from = None
    if stop_reason or done >= planned:
        if epochs <= done:
            reason = stop_reason or f"all {planned} epochs are done"
            raise ImgclfError(
                f"run {paths.root} is already finished ({reason}); pass --epochs N (N > {done}) to train further"
            )
        extend_from, checkpoint.meta["stop_reason"] = done, None
        log.info(
            "training the finished run further, from %d to %d epochs: an extension phase with a fresh warmup and "
            "%s schedule over the %d added epochs, at the last phase's peak learning rate%s",
            done,
            epochs,
            config.train.scheduler,
            epochs - done,
            "; early stopping counts on from the history (raise --patience to give it room)" if stop_reason else "",
        )
    elif epochs != planned:
        log.info(
            "the unfinished run is re-planned from %d to %d epochs: its LR schedule stretches to the new length and "
            "continues from where it stopped",
            planned,
            epochs,
        )
    checkpoint.meta["epochs"] = epochs
    if config != previous:  # saved once every check passed: a refused resume leaves config.yaml as it was
        distributed.on_main(group, partial(save_config, config, paths.config))
        log.info("on resume: %s", ", ".join(f"{key} = {value}" for key, value in given.items()))
    return _train_run(
        paths,
        config,
        manifest,
        progress=progress,
        checkpoint=checkpoint,
        report=report,
        extend_from=extend_from,
        callbacks=callbacks,
    )


@dataclass(frozen=True)
class _Prepared:
    config: RunConfig  # with the data-dependent settings resolved
    index: ImageIndex
    manifest: SplitManifest
    weights: Any  # PretrainedWeights or None
    split: SplitData | None = None  # the duplicates across splits and the groups


def _prepare(
    data: Path, config: RunConfig, *, out: Path | None = None, scanned: ScannedData | None = None, progress: Progress
) -> _Prepared:
    """Check the model, device and pretrained weights (fast failures first), then scan, split (or reuse `scanned`,
    when it is this folder split with these settings) and resolve."""
    from imgclf.builders import is_pretrained
    from imgclf.device import select_device
    from imgclf.models.registry import check_model_name
    from imgclf.models.weights import check_pretrained_request, find_weights

    model = config.model
    check_model_name(model.name)
    select_device(config.train.device)
    check_pretrained_request(model.name, model.pretrained, model.weights)
    weights = find_weights(model.name, model.weights) if is_pretrained(config) else None
    if not data.is_dir():  # before --out is created: a typo leaves nothing behind
        raise DataError(f"dataset folder not found: {data} (expected a folder of class folders)")
    group = distributed.current()
    if out is not None:
        distributed.on_main(group, lambda: check_writable(out))
    # absolute paths: the manifest (and the cache key) must work from any working directory
    if scanned is None or scanned.root != data.resolve() or scanned.settings != _split_settings(config.data):
        scanned = scan_data(data, config, progress=progress)
    index, manifest = scanned.index, scanned.manifest
    resolved = resolve_data_settings(config, index, manifest, weights=weights, processes=group.world_size)
    return _Prepared(resolved, index, manifest, weights, scanned.split)


def _resolve_for_compute(config: RunConfig, compute) -> RunConfig:
    """The settings whose `auto` depends on the hardware: the precision used, and small_cnn's early pooling (on
    where the run computes in fp32 on a CPU, `registry.auto_early_pool`)."""
    from imgclf.models.registry import SMALL_CNN, auto_early_pool

    choices: dict[str, Any] = {}
    if config.train.precision == "auto":
        choices["train.precision"] = compute.precision
    if config.model.early_pool == "auto" and config.model.name == SMALL_CNN:
        choices["model.early_pool"] = auto_early_pool(compute)
        log.info(
            "early pooling: %s (auto: %s)",
            "on" if choices["model.early_pool"] else "off",
            "fp32 on a CPU, half the FLOPs"
            if choices["model.early_pool"]
            else f"{compute.precision} on {compute.device.type}",
        )
    return build_config(config, choices) if choices else config


def _look_for_label_issues(paths: RunPaths, config: RunConfig, manifest: SplitManifest, *, progress: Progress) -> None:
    """label_issues.csv and label_issues.json when `data.label_issues` asks (auto: by the number of images). Under
    auto a failure (no pretrained weights offline) is a warning; asked for explicitly, it stops the run."""
    from imgclf.device import select_device
    from imgclf.evaluation.label_issues import find_label_issues, label_issues_wanted, save_label_issues
    from imgclf.files import write_json_atomic

    setting = config.data.label_issues
    if not label_issues_wanted(setting, len(manifest.rows)):
        return
    try:
        found = find_label_issues(
            manifest.rows,
            max_pixels=config.data.max_pixels,
            cache_dir=config.data.cache_dir,
            device=str(select_device(config.train.device)),
            progress=progress,
        )
    except ImgclfError as exc:
        if setting is True:
            raise
        log.warning("label issues not looked for (data.label_issues: auto): %s", exc)
        return
    save_label_issues(found, paths.label_issues)
    write_json_atomic(paths.label_issues_summary, found.summary())


def _write_data_records(
    paths: RunPaths, problems: Sequence[Problem], manifest: SplitManifest, split: SplitData | None
) -> None:
    write_csv_atomic(paths.problems, PROBLEM_COLUMNS, ((str(p.path), p.reason) for p in problems))
    manifest.save(paths.manifest)
    duplicates = list(split.duplicates) if split is not None else find_duplicates(manifest)
    warn_about_duplicates(duplicates)
    save_duplicates(duplicates, paths.duplicates)
    for split_name, counter in manifest.counts().items():
        log.info("%s: %d images in %d classes", split_name, sum(counter.values()), len(counter))
