"""What the fit loop and its callbacks share: the training state (`FitState`, saved in checkpoints), where an
interrupted epoch stands (`EpochProgress`), the run a callback belongs to (`RunInfo`), and the `Callback` hooks.
Its own module, so that the loop (`engine.py`), the callbacks (`callbacks.py`) and the tracking sinks
(`tracking/sinks.py`) all import it and not each other."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from imgclf.training.optim import LRSchedule

__all__ = ["Callback", "EpochProgress", "FitState", "RunInfo"]


@dataclass
class EpochProgress:
    """Where a training epoch stands: batches done and the running sums of its history row. Saved in the
    checkpoint of a graceful stop, so that the resumed epoch continues at the next batch and ends with the row
    an uninterrupted epoch would have written."""

    step: int = 0
    loss_sum: float = 0.0
    ce_sum: float = 0.0  # plain cross-entropy (no label smoothing, no class weights) of the training batches
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    lr: float | None = None  # the LR at the start of the epoch, for its history row
    rng: list[int] | None = None  # torch's CPU generator state after the last finished batch
    # Several processes (torchrun): each one's generator state (the checkpoint is written by rank 0 alone), and the
    # sums above are those of every process together, which rank 0 alone continues on resume
    rng_by_rank: list[list[int]] | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def cross_entropy(self) -> float:
        return self.ce_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


@dataclass
class FitState:
    """What the loop and its callbacks share. The counters and history are saved in checkpoints."""

    model: nn.Module
    optimizer: Optimizer
    schedule: LRSchedule
    epochs: int
    epoch: int = 0  # completed epochs
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    stop_reason: str | None = None
    phase: str | None = None  # set by the Phases callback: train | frozen | fine-tune
    frozen_norms: list[nn.Module] = field(default_factory=list)  # BatchNorms kept in eval mode while training
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA only
    progress: EpochProgress | None = None  # a partly trained epoch, after a graceful stop
    interrupted_by: str | None = None  # why training stopped mid-epoch (a signal, too many bad images)
    # what the training step runs: DistributedDataParallel around `model` under torchrun (`Phases` makes it again
    # when layers are frozen or unfrozen), else None (= `model`)
    forward: nn.Module | None = None
    # a time budget's record (training/budget.py): seconds, elapsed, first estimate, planned steps, cap
    budget: dict[str, Any] | None = None
    # an exponential moving average of the weights (timm's ModelEmaV3), validated each epoch beside the model
    ema: Any = None
    best_ema_epoch: int | None = None
    best_ema_metric: float | None = None
    kept: str = "raw"  # which weights the run ships: raw (the model's) or ema (their average), set at the end

    def counters(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "stop_reason": self.stop_reason,
            "phase": self.phase,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": asdict(self.progress) if self.progress is not None else None,
            "budget": self.budget,
            "best_ema_epoch": self.best_ema_epoch,
            "best_ema_metric": self.best_ema_metric,
        }

    def restore_counters(self, counters: dict[str, Any]) -> None:
        self.epoch = int(counters["epoch"])
        self.history = [dict(row) for row in counters["history"]]
        self.best_epoch = counters["best_epoch"]
        self.best_metric = counters["best_metric"]
        self.stop_reason = counters["stop_reason"]
        if self.scaler is not None and counters.get("scaler"):
            self.scaler.load_state_dict(counters["scaler"])
        self.progress = EpochProgress(**counters["progress"]) if counters.get("progress") else None
        self.budget = counters.get("budget")
        self.best_ema_epoch = counters.get("best_ema_epoch")
        self.best_ema_metric = counters.get("best_ema_metric")

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs or self.stop_reason is not None


@dataclass(frozen=True)
class RunInfo:
    """The run a callback's run hooks are about: its folder (the run-folder contract: history.csv, metrics.json,
    model/, report.html), its resolved configuration as config.yaml holds it, and its classes."""

    root: Path
    config: Mapping[str, Any]
    classes: tuple[str, ...]
    resumed: bool = False  # continues an earlier session of the same run folder


class Callback:
    """Hooks called by `fit()` (fit, epoch, batch, interrupt) and by the workflow around it (run start and end);
    each does nothing unless overridden.

    Example:
        >>> import imgclf
        >>> class PrintEnd(Callback):
        ...     def on_run_end(self, run, metrics, status):
        ...         print(run.root.name, status, run.classes)
        >>> result = imgclf.train("data/", {"train": {"epochs": 1}}, report=False, callbacks=[PrintEnd()])
        small_cnn-... finished ('digit0', 'digit1', 'digit2')
    """

    def on_run_start(self, run: RunInfo) -> None:
        """Before the first epoch of this session, with the configuration resolved (batch size, LR, precision)."""

    def on_run_end(self, run: RunInfo, metrics: Mapping[str, Any] | None, status: str) -> None:
        """After the test evaluation and the report (`metrics`: metrics.json's content, None when the test split
        was not evaluated), or when the run stops or fails (`status`: finished | stopped | failed)."""

    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_epoch_start(self, state: FitState) -> None:
        pass

    def on_batch_end(self, state: FitState, index: int, loss: torch.Tensor, batch_size: int) -> None:
        pass

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        pass

    def on_fit_end(self, state: FitState) -> None:
        pass

    def on_interrupt(self, state: FitState) -> None:
        """Training stops mid-epoch (a signal); `state.progress` says where."""
