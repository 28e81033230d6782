"""`train`: a new run from a data folder (checks, scan, the run folder and its records, then `_train_run`), its
`--fast-dev-run` variant, and `lr_find` (the LR range test on the same preparation)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from imgclf.config import RunConfig, TrainConfig, build_config, save_config
from imgclf.data.settings import preprocessing_of
from imgclf.errors import ConfigError
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tracking.runs import RunPaths, create_run_dir, environment_info, write_env
from imgclf.training import distributed
from imgclf.workflow.data import ScannedData, _look_for_label_issues, _Prepared, _write_data_records
from imgclf.workflow.results import TrainResult
from imgclf.workflow.run import _resolve_for_compute, _resolve_width, _train_run

__all__ = ["FAST_DEV_RUN", "lr_find", "train"]

log = logging.getLogger(__name__)


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
        resume: an existing run folder to continue from its last checkpoint, in that folder, on its data, with its
            config: `data`, `config`, `name` and `fast_dev_run` are refused with it (a ConfigError).
        epochs: with `resume`, a new total number of epochs (to extend a finished run); the same as
            `resume_settings={"train.epochs": N}`.
        resume_settings: with `resume`, other settings to change, as dotted keys (`{"train.device": "cuda"}`); only
            `RESUME_SETTINGS` may change, anything else is a ConfigError naming the keys.
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
        >>> import imgclf
        >>> result = imgclf.train("data/", {"train": {"epochs": 2}})
        >>> result.run_dir, result.metrics["n"], result.metrics["accuracy"] > 0.5  # 9 test images; chance is 1/3
        (PosixPath('runs/small_cnn-...'), 9, True)
    """
    if resume is not None:
        from imgclf.workflow.resume import _resume  # here: resume.py imports this module (reproduce trains)

        settings = {**(resume_settings or {}), **({"train.epochs": epochs} if epochs is not None else {})}
        new_run = (
            ("a data folder", data),
            ("a config", config),
            ("a run name", name),
            ("a fast dev run", fast_dev_run),
        )
        return _resume(
            Path(resume),
            settings=settings,
            new_run=[what for what, value in new_run if value],
            report=report,
            callbacks=callbacks,
            progress=progress,
        )
    if data is None:
        raise ConfigError("train needs a data folder (or --resume runs/<name>)")
    config = build_config(config)
    group = distributed.setup(config.train.device)  # under torchrun: join the other processes
    progress = progress if group.is_main else Progress()  # one process draws the bars
    # 1. the fast checks, the scan and split, the settings that depend on the data
    prepared = _prepare_run(Path(data), config, Path(out), scanned, fast_dev_run=fast_dev_run, progress=progress)
    config = prepared.config
    # 2. one folder, named once (by rank 0) for every process
    paths = distributed.on_main(group, lambda: create_run_dir(Path(out), name, config.model.name, dev_run=fast_dev_run))
    log.info("run folder: %s", paths.root)
    # 3. what the folder says before training: data records, config.yaml, env.json, label issues
    env = _environment(Path(data), config, prepared, group, fast_dev_run=fast_dev_run)
    distributed.on_main(group, partial(_write_records, paths, config, env, prepared, progress=progress))
    # 4. the run itself
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


def _prepare_run(
    data: Path, config: RunConfig, out: Path, scanned: ScannedData | None, *, fast_dev_run: bool, progress: Progress
) -> _Prepared:
    """`_prepare` with `--fast-dev-run`'s settings around it: a sliver of the data before the scan, two training
    batches after it."""
    from imgclf import workflow  # `_prepare` looked up on the package, where tests wrap it

    if fast_dev_run:
        config = build_config(config, FAST_DEV_RUN)
        if config.train.lr == "auto":  # the LR finder's 100 steps would be most of the run
            config = build_config(config, {"train.lr": TrainConfig().lr})
    prepared = workflow._prepare(data, config, out=out, scanned=scanned, progress=progress)
    if not fast_dev_run:
        return prepared
    train_images = len(prepared.manifest.split("train"))
    return replace(prepared, config=build_config(prepared.config, {"train.batch_size": max(1, -(-train_images // 2))}))


def _environment(data: Path, config: RunConfig, prepared: _Prepared, group, *, fast_dev_run: bool) -> dict[str, Any]:
    """What env.json records about the run: versions, device, seed, the data folder, the weights, the processes."""
    from imgclf.device import describe_device, select_device  # lazy: torch

    env = environment_info(
        device=describe_device(select_device(distributed.device_for(group, config.train.device))),
        seed=config.train.seed,
    )
    env["data"] = str(data.resolve())  # what the report's next steps train on
    if fast_dev_run:
        env["fast_dev_run"] = True
    if prepared.weights is not None:
        env["pretrained_weights"] = {"source": prepared.weights.source, "not_used": list(prepared.weights.tried)}
    if group.enabled:
        env["distributed"] = _distributed_record(group, config)
    return env


def _write_records(
    paths: RunPaths, config: RunConfig, env: dict[str, Any], prepared: _Prepared, *, progress: Progress
) -> None:
    """The run folder's files before training (rank 0): problems, manifest, duplicates, config.yaml, env.json and,
    when `data.label_issues` asks, the label issues."""
    _write_data_records(paths, prepared.index.problems, prepared.manifest, prepared.split)
    save_config(config, paths.config)
    write_env(paths, env)
    _look_for_label_issues(paths, config, prepared.manifest, progress=progress)


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
        >>> import imgclf
        >>> found = imgclf.lr_find("data/", num_steps=30)
        >>> found.method, sorted(path.name for path in Path(".").glob("lr_find.*"))  # then train at found.suggestion
        ('steepest descent', ['lr_find.csv', 'lr_find.png'])
    """
    from imgclf import (
        builders,
        workflow,  # `_prepare` looked up on the package, as `train` does
    )
    from imgclf.device import resolve_compute

    prepared = workflow._prepare(Path(data), build_config(config), progress=progress)
    config, manifest = prepared.config, prepared.manifest
    compute = resolve_compute(config.train.device, config.train.precision, config.train.channels_last)
    config = _resolve_for_compute(config, compute)
    pre = preprocessing_of(config)
    loaders = builders.make_loaders(config, manifest, pre, compute, progress=progress)
    config = _resolve_width(config, manifest, pre, compute, loaders, prepared.weights)
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
