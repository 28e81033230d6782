"""Runs made again from a run folder: `--resume` (`_resume`: continue from the last checkpoint, or train a finished
run further) and `reproduce` (the same run trained anew on the same files), with the rules of what each may change
(`RESUME_SETTINGS`, `REPRODUCE_SETTINGS`) and what each refuses. These rules live here only: the CLI passes every
setting the user gave as config keys and writes the keys a refusal names as its flags."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from imgclf.config import RunConfig, check_key, load_config, save_config
from imgclf.data.split import SplitManifest, compare_manifests
from imgclf.errors import ConfigError, DataError, ImgclfError
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tracking.runs import RunPaths, find_run, read_json, write_env
from imgclf.training import distributed
from imgclf.workflow.data import scan_data
from imgclf.workflow.results import TrainResult
from imgclf.workflow.run import _train_run
from imgclf.workflow.train import train

__all__ = ["REPRODUCE_SETTINGS", "RESUME_SETTINGS", "reproduce"]

log = logging.getLogger(__name__)


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


def _refused(given: Mapping[str, Any], allowed: Sequence[str], where: str) -> list[str]:
    """The keys among `given` outside `allowed`, sorted; an unknown key is a ConfigError of its own (a typo is not
    a setting that would make another run)."""
    for key in given:
        check_key(key, where)
    return sorted(set(given) - set(allowed))


def _resume(
    run_dir: Path,
    *,
    settings: Mapping[str, Any],
    new_run: Sequence[str] = (),
    report: bool,
    callbacks: Sequence[Any] = (),
    progress: Progress,
) -> TrainResult:
    """Continue a run from `checkpoints/last.safetensors`, or train a finished one further.

    `settings` (dotted keys; None = not given) may change only `RESUME_SETTINGS`; `new_run` names what else the
    caller was given that only a new run takes ("a data folder", "a run name"), refused with them. A finished run
    (all its epochs, or stopped early) trained to a larger `train.epochs` gets an extension phase: a fresh warmup
    and schedule over the added epochs, at the last phase's peak LR. An unfinished run given another
    `train.epochs` has its schedule re-planned to that length.
    """
    from imgclf.training.checkpoint import load_checkpoint

    paths = find_run(run_dir)
    given = {key: value for key, value in settings.items() if value is not None}
    refused = [*new_run, *_refused(given, RESUME_SETTINGS, "resume")]
    if refused:
        raise ConfigError(
            f"resuming {paths.root} continues it in its folder, on its data, with the settings it was trained with; "
            f"{', '.join(refused)} would make it another run and cannot change (start a new run for that). On "
            f"resume these may change: {', '.join(RESUME_SETTINGS)}"
        )
    # 1. the run as it was, with the settings given, and the checkpoint it stopped at
    previous = load_config(paths.config)
    config = load_config(paths.config, given)
    group = distributed.setup(config.train.device)  # under torchrun: join the other processes
    progress = progress if group.is_main else Progress()
    manifest = SplitManifest.load(paths.manifest)
    checkpoint = load_checkpoint(paths.checkpoints / "last.safetensors")
    # 2. what the checkpoint allows, and how many epochs are left (an extension phase for a finished run)
    _check_checkpoint(paths, manifest, checkpoint.meta, group.world_size)
    extend_from = _plan_epochs(paths, config, checkpoint.meta, asked=given.get("train.epochs"))
    # 3. the new settings recorded, once every check passed: a refused resume leaves config.yaml as it was
    if config != previous:
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


def _check_checkpoint(paths: RunPaths, manifest: SplitManifest, meta: Mapping[str, Any], processes_now: int) -> None:
    """Refuse a checkpoint whose classes differ from the manifest's, or one written in the middle of an epoch by
    another number of processes than this resume has."""
    saved_classes = tuple(meta.get("classes", manifest.classes))
    if saved_classes != manifest.classes:
        raise DataError(f"{paths.manifest} classes {manifest.classes} differ from the checkpoint's {saved_classes}")
    done = int(meta["epoch"])
    processes = int(meta.get("processes", 1))
    if meta.get("progress") and processes != processes_now:
        # each process resumes its own slice of the stopped epoch's order with its own random state
        how = f"under torchrun --nproc-per-node {processes} (or --devices {processes})" if processes > 1 else "alone"
        raise ConfigError(
            f"{paths.checkpoints / 'last.safetensors'} stopped in the middle of epoch {done + 1} with {processes} "
            f"process(es); it resumes only with {processes} (received {processes_now}): run --resume {how}"
        )


def _plan_epochs(paths: RunPaths, config: RunConfig, meta: dict[str, Any], *, asked: int | None) -> int | None:
    """The epochs a resumed run goes on to (`train.epochs`, written into the checkpoint's `meta`) and, for a
    finished run trained further, the epoch its extension phase starts after (None for an unfinished run).

    Refuses a finished run without more epochs, and any further training of a finished budgeted run."""
    done, planned = int(meta["epoch"]), int(meta["epochs"])
    stop_reason = meta.get("stop_reason")
    finished = bool(stop_reason) or done >= planned
    if config.train.time_budget is not None and finished:
        # --epochs asks for an extension: a usage error; else nothing is left
        raise (ConfigError if asked else ImgclfError)(
            f"run {paths.root} was trained to a time budget of {config.train.time_budget} and is finished with its "
            f"schedule complete ({stop_reason or f'all {planned} epochs done'}); a budgeted run is not trained "
            f"further{f' (received --epochs {asked})' if asked else ''}. Start a new run with a larger --time"
        )
    epochs = config.train.epochs
    extend_from = None
    if finished:
        if epochs <= done:
            reason = stop_reason or f"all {planned} epochs are done"
            raise ImgclfError(
                f"run {paths.root} is already finished ({reason}); pass --epochs N (N > {done}) to train further"
            )
        extend_from, meta["stop_reason"] = done, None
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
    meta["epochs"] = epochs
    return extend_from


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
        settings: dotted keys of `REPRODUCE_SETTINGS` (where it computes and is recorded; None = not given);
            others are refused, naming them.
        report: write the report at the end.
        callbacks: more callbacks (see `train`).
        progress: progress reporter.

    Raises:
        DataError: the folder differs from the manifest (nothing is trained); ConfigError: a refused setting.

    Example:
        >>> import imgclf
        >>> from imgclf.evaluation.diagnose.curves import read_history
        >>> old = read_history("runs/small_cnn-20261128-120000/history.csv")
        >>> new = read_history(imgclf.reproduce("runs/small_cnn-20261128-120000", report=False).run_dir / "history.csv")
        >>> [row["train_loss"] for row in new] == [row["train_loss"] for row in old]  # all but the seconds
        True
    """
    paths = find_run(Path(run))
    given = {key: value for key, value in (settings or {}).items() if value is not None}
    refused = _refused(given, REPRODUCE_SETTINGS, "reproduce")
    if refused:
        raise ConfigError(
            f"reproducing {paths.root} trains with its own settings; {', '.join(refused)} would make it another "
            f"run. These may change: {', '.join(REPRODUCE_SETTINGS)}"
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
