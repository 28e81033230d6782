"""Everything around a training step that is not the step: history, model selection, early stopping,
checkpoints, progress. Each callback is small and overrides only the hooks it needs."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from imgclf.errors import TrainingDiverged
from imgclf.files import write_csv_atomic
from imgclf.models.finetune import Phase, phase_at, set_phase_lrs, set_trainable
from imgclf.progress import Progress, Task
from imgclf.training.checkpoint import load_checkpoint, save_checkpoint, save_weights
from imgclf.training.state import Callback, FitState

if TYPE_CHECKING:
    from imgclf.training.optim import LRSchedule

__all__ = [
    "Checkpointer",
    "EarlyStopping",
    "EpochLog",
    "GracefulStop",
    "HistoryCSV",
    "Monitor",
    "Phases",
    "ProgressBar",
]

log = logging.getLogger(__name__)

# train_loss is the objective (with label smoothing, class weights, MixUp/CutMix as configured); train_ce the
# plain cross-entropy of the same batches, which is what val_loss measures on clean validation images.
# val_loss_se: the standard error of val_loss over its val_images; steps: optimizer steps in the epoch;
# train_images: images they saw. With train.ema: the averaged weights' val loss and accuracy; with a time budget:
# the budget's seconds spent at the epoch's end and the steps planned for the (last) phase.
HISTORY_COLUMNS = (
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
)
# Written only by runs that have them: train.ema's, a time budget's
OPTIONAL_COLUMNS = ("val_loss_ema", "val_acc_ema", "budget_s", "planned_steps")


@dataclass(frozen=True)
class Monitor:
    """A history column and the direction in which it improves."""

    name: str
    mode: Literal["min", "max"]

    @classmethod
    def resolve(cls, name: str, mode: Literal["auto", "min", "max"] = "auto") -> Monitor:
        if mode == "auto":
            mode = "max" if name.endswith("acc") else "min"
        return cls(name, mode)

    def improved(self, value: float, best: float | None, min_delta: float = 0.0) -> bool:
        if best is None:
            return True
        return value < best - min_delta if self.mode == "min" else value > best + min_delta


class Phases(Callback):
    """Enters each phase of a fine-tuning plan at its first epoch: freezes or unfreezes stages, sets the phase's
    learning rates and starts its LR schedule (see `imgclf.models.finetune`)."""

    def __init__(
        self,
        phases: list[Phase],
        make_schedule: Callable[[Phase], LRSchedule],
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.phases = phases
        self.make_schedule = make_schedule
        self.wrap = wrap  # under torchrun: DDP around the model, made again for each phase's trainable layers

    def enter(self, state: FitState, epoch: int) -> None:
        """Put the model and optimizer in the state of the phase that `epoch` belongs to."""
        phase = phase_at(self.phases, epoch)
        state.frozen_norms = set_trainable(state.model, phase)
        if self.wrap is not None:
            state.forward = self.wrap(state.model)
        set_phase_lrs(state.optimizer, phase.lr)
        state.schedule = self.make_schedule(phase)
        if state.phase is not None and state.phase != phase.name:
            trainable = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
            log.info(
                "epoch %d: %s phase, %s trainable parameters, peak lr %.2e",
                epoch,
                phase.name,
                f"{trainable:,}",
                phase.lr,
            )
        state.phase = phase.name

    def on_epoch_start(self, state: FitState) -> None:
        epoch = state.epoch + 1
        if phase_at(self.phases, epoch).name != state.phase:
            self.enter(state, epoch)


class HistoryCSV(Callback):
    """Rewrites `history.csv` (one row per epoch) after every epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        extra = [column for column in OPTIONAL_COLUMNS if any(column in r for r in state.history)]
        columns = [*HISTORY_COLUMNS, *extra]
        rows = ([_short(r.get(column, "")) for column in columns] for r in state.history)
        write_csv_atomic(self.path, columns, rows)


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    The count is derived from the history alone, so a resumed run stops exactly where an uninterrupted one would.
    """

    def __init__(self, monitor: Monitor, patience: int, min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        values = [r[self.monitor.name] for r in state.history]
        best: float | None = None
        last_improvement = 0
        for index, value in enumerate(values):
            if self.monitor.improved(value, best, self.min_delta):
                best, last_improvement = value, index
        waited = len(values) - 1 - last_improvement
        if waited >= self.patience and not state.finished:
            state.stop_reason = (
                f"early stopping: {self.monitor.name} did not improve for {waited} epochs "
                f"(best {best:.4f} at epoch {last_improvement + 1})"
            )
            log.info(state.stop_reason)


class Checkpointer(Callback):
    """Tracks the best epoch and writes `last.safetensors` every epoch and `best.safetensors` when it improves;
    at the end, loads the best weights back into the model.

    With a moving average of the weights (`state.ema`), its best epoch is tracked too (`best_ema.safetensors`), and
    at the end the better of the two by the monitored validation metric is loaded (a tie keeps the model's own
    weights); `state.kept` says which."""

    def __init__(self, folder: Path, monitor: Monitor, extra_meta: dict | None = None, *, write: bool = True) -> None:
        self.folder = Path(folder)
        self.monitor = monitor
        self.extra_meta = extra_meta or {}
        self.write = write  # False on the processes other than rank 0: they track and check, rank 0 writes

    @property
    def last(self) -> Path:
        return self.folder / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.folder / "best.safetensors"

    @property
    def best_ema(self) -> Path:
        return self.folder / "best_ema.safetensors"

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        # Weights can stay finite while being garbage: one step at a huge LR gave weights of ~3e38 whose
        # validation loss was NaN; saving them as `last` would make --resume start from a broken epoch.
        val_loss = row.get("val_loss")
        if val_loss is not None and not math.isfinite(val_loss):
            raise TrainingDiverged(
                f"the validation loss became {val_loss} in epoch {state.epoch}; {self.last} keeps the last good "
                "epoch. Try a lower --lr (a tenth), --set train.grad_clip=1.0, or --set train.precision=fp32"
            )
        improved = self.monitor.improved(row[self.monitor.name], state.best_metric)
        if improved:
            state.best_metric = row[self.monitor.name]
            state.best_epoch = state.epoch
        averaged = f"{self.monitor.name}_ema"
        improved_ema = state.ema is not None and self.monitor.improved(row[averaged], state.best_ema_metric)
        if improved_ema:
            state.best_ema_metric, state.best_ema_epoch = row[averaged], state.epoch
        self._save_last(state)
        if improved and self.write:
            _link_or_copy(self.last, self.best)
        if improved_ema and self.write:
            save_weights(self.best_ema, state.ema.module, {**self.extra_meta, "epoch": state.epoch, "ema": True})

    def on_interrupt(self, state: FitState) -> None:
        self._save_last(state)  # mid-epoch: its progress lets --resume continue at the next batch

    def _save_last(self, state: FitState) -> None:
        # buffers too: a BatchNorm running variance that overflowed is as broken as a weight
        tensors = state.model.state_dict().values()
        if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
            epoch = state.epoch + 1 if state.progress is not None else state.epoch  # mid-epoch: the one under way
            raise TrainingDiverged(
                f"the weights stopped being finite numbers in epoch {epoch}; {self.last} keeps the last good "
                "epoch. Try a lower --lr, --set train.grad_clip=1.0, or --set train.precision=fp32"
            )
        if not self.write:
            return
        ema = state.ema.module.state_dict() if state.ema is not None else None
        meta = {**self.extra_meta, **state.counters(), "monitor": self.monitor.name}
        if state.ema is not None:
            meta["ema_steps"] = state.ema.steps
        save_checkpoint(
            self.last,
            model=state.model,
            optimizer=state.optimizer,
            schedule_state=state.schedule.state_dict(),
            meta=meta,
            ema=ema,
        )

    def on_fit_end(self, state: FitState) -> None:
        ema_better = state.ema is not None and self.monitor.improved(state.best_ema_metric, state.best_metric)
        state.kept = "ema" if ema_better else "raw"  # every process: the metrics are the same on all
        source = self.best_ema if ema_better else self.best
        if self.write and source.exists():
            state.model.load_state_dict(load_checkpoint(source).model)
            epoch, value = (
                (state.best_ema_epoch, state.best_ema_metric) if ema_better else (state.best_epoch, state.best_metric)
            )
            log.info(
                "restored the best %s (epoch %s, %s %.4f)%s",
                "EMA weights (their moving average)" if ema_better else "weights",
                epoch,
                self.monitor.name,
                value,
                f"; the model's own weights reached {state.best_metric:.4f}"
                if ema_better
                else (f"; the EMA reached {state.best_ema_metric:.4f}" if state.ema is not None else ""),
            )


class EpochLog(Callback):
    """One log line per epoch."""

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        marker = "  *" if state.best_epoch == state.epoch else ""
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e | %.1f s, %.0f img/s%s",
            state.epoch,
            state.epochs,
            row["train_loss"],
            row["train_acc"],
            row["val_loss"],
            row["val_acc"],
            row["lr"],
            row["seconds"],
            row["images_per_s"],
            marker,
        )


class ProgressBar(Callback):
    """A progress bar per epoch with the running training loss."""

    def __init__(self, progress: Progress, steps_per_epoch: int, every: int = 10) -> None:
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch
        self.every = every  # .item() is a device sync point; read the loss only every few steps
        self._context: AbstractContextManager[Task] | None = None
        self._task: Task | None = None
        self._pending = 0

    def on_epoch_start(self, state: FitState) -> None:
        self._context = self.progress.task(f"epoch {state.epoch + 1}/{state.epochs}", total=self.steps_per_epoch)
        self._task = self._context.__enter__()
        self._pending = 0

    def on_batch_end(self, state: FitState, index: int, loss: torch.Tensor, batch_size: int) -> None:
        self._pending += 1
        if self._task is not None and (index % self.every == 0 or index + 1 == self.steps_per_epoch):
            self._task.advance(self._pending, loss=f"{loss.item():.4f}")
            self._pending = 0

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        self._close()

    def on_interrupt(self, state: FitState) -> None:
        self._close()

    def _close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = self._task = None


class GracefulStop:
    """While active, SIGINT and SIGTERM ask training to stop after the current batch (see `fit`'s
    `should_stop`); a second SIGINT stops at once (KeyboardInterrupt), without touching written checkpoints.

    Example:
        >>> with GracefulStop() as stop:  # around fit(state, ..., should_stop=stop.requested)
        ...     signal.raise_signal(signal.SIGTERM)  # as `kill` would
        ...     stop.requested()
        'SIGTERM'
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> str | None:
        return signal.Signals(self.signal_number).name if self.signal_number is not None else None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: object) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_number = number
        log.warning(
            "%s received: stopping after the current batch (press Ctrl-C again to stop at once)",
            signal.Signals(number).name,
        )


def _short(value: object) -> object:
    """Seven significant digits are plenty for a history file a person reads."""
    return float(f"{value:.7g}") if isinstance(value, float) else value


def _link_or_copy(source: Path, target: Path) -> None:
    """Make `target` a complete copy of `source` atomically (a hard link when the file system allows)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
