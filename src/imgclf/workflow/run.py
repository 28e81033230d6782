"""One training run. Around it (`_train_run`): status.json kept true and the extra callbacks' run hooks, ended
once however the run ends. Inside it (`_fit_run`), the recipe in numbered steps: compute -> loaders (and the LR
finder) -> model, optimizer, phases (or a checkpoint's state) -> callbacks -> fit -> bundle (OOD threshold,
temperature) -> test evaluation -> report."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from imgclf.config import RunConfig, build_config, save_config
from imgclf.data.preprocessing import Preprocessing
from imgclf.data.settings import preprocessing_of
from imgclf.data.split import SplitManifest
from imgclf.errors import DataError, ImgclfError, TrainingInterrupted
from imgclf.evaluation import evaluate as evaluation
from imgclf.progress import Progress
from imgclf.tracking.runs import RunPaths, record_status
from imgclf.training import distributed
from imgclf.workflow.results import TrainResult

__all__: list[str] = []  # the workflow's internals: `_train_run` (train, resume), `_resolve_for_compute` and
# `_resolve_width` (lr_find)

log = logging.getLogger(__name__)


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
    """The recipe: compute -> loaders (-> small_cnn's width, LR finder) -> model, optimizer, phases (or the
    checkpoint's state) -> callbacks -> fit -> bundle (OOD threshold, -> temperature) -> test evaluation -> report."""
    from imgclf import builders
    from imgclf.deploy.bundle import kept_weights
    from imgclf.training import callbacks as cb
    from imgclf.training.restore import restore_fit
    from imgclf.training.state import RunInfo

    group = distributed.current()  # one process, or this one's place among torchrun's
    # 1. where it computes, and the settings whose `auto` depends on it (recorded in config.yaml)
    config, compute = _compute_for(paths, config, group)
    pre = preprocessing_of(config)
    # 2. data (this process's slice of it); small_cnn's width for the budget and an LR from the LR finder (both
    # decided by rank 0) when asked for
    loaders = builders.make_loaders(config, manifest, pre, compute, group=group, progress=progress)
    steps = len(loaders.train)
    config = _width(paths, config, manifest, pre, compute, loaders, weights, group)
    config = _learning_rate(paths, config, manifest, pre, compute, loaders.train, weights, group, progress=progress)
    # 3. model (pretrained weights under a new head), optimizer, loss, phases; or the saved state when resuming
    stopping = config.train.early_stopping
    monitor = cb.Monitor.resolve(stopping.monitor, stopping.mode)
    sample = builders.whitening_sample(config, loaders.train, pre, weights) if checkpoint is None else None
    state, spec, loss_fn, phases = builders.make_fit_state(
        config,
        manifest,
        pre,
        steps,
        monitor.mode,
        compute,
        weights,
        extend_from=extend_from,
        group=group,
        train_sample=sample,
    )
    if checkpoint is not None:
        restore_fit(state, phases, checkpoint)
        log.info("resuming after epoch %d of %d (%s phase)", state.epoch, state.epochs, state.phase)
    else:
        phases.enter(state, 1)
    # 4. everything around the step
    budget = _time_budget(config, state, phases, steps, len(loaders.val), group)
    callbacks = _callbacks(
        paths, stopping, monitor, phases, budget, hooks.callbacks, manifest.classes, steps, group, progress=progress
    )
    hooks.start(RunInfo(paths.root, config.model_dump(mode="json"), manifest.classes, resumed=checkpoint is not None))
    _log_start(spec, state, loaders, manifest.classes, config, pre, compute, group)
    # 5. train; the best weights are loaded back at the end. Ctrl-C or SIGTERM stop after the current batch.
    _fit(paths, config, state, loaders, manifest.classes, loss_fn, compute, monitor, callbacks, pre, budget, group)
    kept_epoch, _ = kept_weights(state)
    if not group.is_main:  # rank 0 ships and evaluates the model; the other processes are done
        return TrainResult(paths.root, None, state.history, kept_epoch, state.stop_reason, None, state.kept)
    # 6. ship the best weights (the model's, or their average's when it validated better) with their preprocessing
    # (and a temperature fitted on val), evaluate once on test
    predictor = _ship(paths, config, manifest, state, spec, pre, compute, monitor.name, progress=progress)
    metrics = None
    if evaluate_test:
        rows, used_split = evaluation.manifest_rows(manifest, "test")
        metrics = evaluation.evaluate_rows(
            predictor, rows, used_split, paths.root, batch_size=2 * config.train.batch_size, progress=progress
        )
    # 7. the report, from the run folder's files
    built = None
    if report:
        from imgclf.evaluation.report import build_report

        built = build_report(paths.root, device=compute.device, progress=progress)
    return TrainResult(paths.root, metrics, state.history, kept_epoch, state.stop_reason, built, state.kept)


def _compute_for(paths: RunPaths, config: RunConfig, group):
    """This process's `Compute` (device, precision, channels_last, threads) and the config with the settings whose
    `auto` depends on it resolved (`_resolve_for_compute`); config.yaml records what is used."""
    from imgclf.device import resolve_compute

    train_cfg = config.train
    compute = resolve_compute(
        distributed.device_for(group, train_cfg.device),
        train_cfg.precision,
        train_cfg.channels_last,
        train_cfg.deterministic,
        processes_per_node=group.local_world_size,
    )
    resolved = _resolve_for_compute(config, compute)
    if resolved != config:  # config.yaml records what was used
        distributed.on_main(group, partial(save_config, resolved, paths.config))
    return resolved, compute


def _width(paths: RunPaths, config: RunConfig, manifest, pre, compute, loaders, weights, group) -> RunConfig:
    """The config with small_cnn's `model.width: auto` decided by rank 0 (`_resolve_width`: from the time
    budget, timed over a few steps) and recorded in config.yaml; unchanged with a given width or another model."""
    resolved = distributed.on_main(group, lambda: _resolve_width(config, manifest, pre, compute, loaders, weights))
    if resolved != config:
        distributed.on_main(group, partial(save_config, resolved, paths.config))
    return resolved


def _resolve_width(
    config: RunConfig, manifest: SplitManifest, pre: Preprocessing, compute, loaders, weights
) -> RunConfig:
    """The config with small_cnn's `model.width: auto` decided (other models and given widths: unchanged). With
    small_cnn weights, the width they were trained with. Else, under a time budget on a training set of
    `budget.WIDEN_FROM_IMAGES` or more, the default width's training step is timed over a few batches of the
    training loader (a model built for it and thrown away) and `budget.width_for_budget` picks the width from the
    epochs the budget holds at that speed; without a budget, the default. The choice is logged.
    """
    from imgclf import builders
    from imgclf.config import parse_duration
    from imgclf.models.registry import SMALL_CNN
    from imgclf.models.weights import small_cnn_width
    from imgclf.training.budget import PROBE_STEPS, SMALL_CNN_WIDTHS, WIDEN_FROM_IMAGES, budget_epochs, width_for_budget
    from imgclf.training.optim import seconds_per_step

    if config.model.width != "auto" or config.model.name != SMALL_CNN:
        return config
    default = SMALL_CNN_WIDTHS[0]
    train_images = len(manifest.split("train"))
    if weights is not None:
        width = small_cnn_width(weights) or default
        log.info("small_cnn width: %d (auto: that of the weights)", width)
    elif config.train.time_budget is None or train_images < WIDEN_FROM_IMAGES:
        width = default
    else:
        probe = build_config(config, {"model.width": default, "train.lr": 1e-3})  # its steps are thrown away
        state, _, loss_fn, _ = builders.make_fit_state(probe, manifest, pre, len(loaders.train), "min", compute)
        step = seconds_per_step(state.model, loaders.train, state.optimizer, loss_fn, compute, steps=PROBE_STEPS)
        budget = config.train.time_budget
        epochs = budget_epochs(
            parse_duration(budget, "train.time_budget"),
            step,
            steps_per_epoch=len(loaders.train),
            val_batches=len(loaders.val),
        )
        width = width_for_budget(epochs, train_images)
        log.info(
            "small_cnn width: %d (auto: the %s budget holds ~%.0f epochs of width %d)", width, budget, epochs, default
        )
    return build_config(config, {"model.width": width})


def _learning_rate(
    paths: RunPaths, config: RunConfig, manifest, pre, compute, train_loader, weights, group, *, progress: Progress
) -> RunConfig:
    """The config with `train.lr: auto` replaced by the LR finder's suggestion (found by rank 0 and recorded in
    config.yaml); unchanged with a given LR."""
    from imgclf import builders

    if config.train.lr != "auto":
        return config
    found = distributed.on_main(
        group,
        lambda: builders.find_learning_rate(
            config, manifest, pre, compute, train_loader, len(train_loader), weights, paths.root, progress=progress
        ),
    )
    config = build_config(config, {"train.lr": found.suggestion})
    distributed.on_main(group, partial(save_config, config, paths.config))
    return config


def _callbacks(
    paths: RunPaths, stopping, monitor, phases, budget, extra: Sequence[Any], classes, steps: int, group, *, progress
) -> list:
    """The fit's callbacks, in the order they run: phases, the time budget, history, early stopping, checkpoints,
    the log and the bar, then the extra ones (tracking sinks, the caller's). Every process takes the decisions
    (phases, early stopping, the checkpoint's checks: the history rows are the same on all); rank 0 alone writes
    and shows."""
    from imgclf.training import callbacks as cb

    main = group.is_main
    early = [cb.EarlyStopping(monitor, stopping.patience, stopping.min_delta)] if stopping.patience is not None else []
    return [
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
        *extra,
    ]


def _log_start(spec, state, loaders, classes, config: RunConfig, pre: Preprocessing, compute, group) -> None:
    """One line saying what trains on what, where and how."""
    import torch

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


def _fit(
    paths: RunPaths,
    config: RunConfig,
    state,
    loaders,
    classes,
    loss_fn,
    compute,
    monitor,
    callbacks,
    pre,
    budget,
    group,
) -> None:
    """`fit()` to the end of the plan or to a stop. A stop in the middle raises, naming the checkpoint it resumes
    from: `TrainingInterrupted` for a signal (its exit code), `DataError` for too many broken images."""
    import torch

    from imgclf import builders
    from imgclf.training import callbacks as cb
    from imgclf.training.engine import fit

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
                seed=config.train.seed,
                monitor=monitor.name,
                grad_clip=config.train.grad_clip,
                mix=builders.mixing(config, len(classes)),
                should_stop=should_stop,
                callbacks=callbacks,
                resolution=_resolution_schedule(config, pre),
                group=group,
                step_limit=(lambda: budget.epoch_step_limit(state)) if budget is not None else None,
            )
        except torch.OutOfMemoryError as exc:
            raise _out_of_memory(exc, config.train.batch_size) from None
    if state.interrupted_by is not None:
        where = (
            f"stopped in epoch {state.epoch + 1} after batch {state.progress.step} of {len(loaders.train)}; "
            f"{paths.checkpoints / 'last.safetensors'} holds that point. Continue with: imgclf train --resume "
            f"{paths.root}"
        )
        # the signal may have reached another process only: its name, shared by all, gives the exit code
        signal_number = stop.signal_number or _signal_number(state.interrupted_by)
        if signal_number is not None:
            raise TrainingInterrupted(f"{state.interrupted_by}: {where}", signal_number)
        raise DataError(f"{state.interrupted_by}. The run {where} once the files are fixed or removed")


def _ship(paths: RunPaths, config: RunConfig, manifest, state, spec, pre, compute, monitor: str, *, progress):
    """Save the kept weights as the run's bundle and return their `Predictor`, with the OOD threshold chosen on
    validation and (`train.calibrate`) a temperature fitted there, both stored in the bundle."""
    from imgclf.deploy.bundle import fitted_bundle, save_bundle
    from imgclf.deploy.predict import Predictor
    from imgclf.deploy.runtimes import TorchRuntime

    bundle = fitted_bundle(
        state,
        spec,
        manifest.classes,
        pre,
        run=paths.root.name,
        monitor=monitor,
        ema_decay=config.train.ema_decay,
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
    return predictor


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


def _resolve_for_compute(config: RunConfig, compute) -> RunConfig:
    """The config with the settings whose `auto` depends on the hardware resolved for `compute`: the precision and
    small_cnn's early pooling (decided by `device.resolve_auto_settings`; the choice of early pooling is logged)."""
    from imgclf.device import resolve_auto_settings
    from imgclf.models.registry import SMALL_CNN

    auto = resolve_auto_settings(
        compute,
        precision=config.train.precision,
        early_pool=config.model.early_pool,
        has_early_pool=config.model.name == SMALL_CNN,
    )
    if auto.early_pool is not None:
        log.info("early pooling: %s (auto: %s)", "on" if auto.early_pool else "off", auto.early_pool_reason)
    overrides = auto.overrides()
    return build_config(config, overrides) if overrides else config
