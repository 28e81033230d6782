"""The training loop: `fit()` runs epochs of `train_one_epoch()` and `evaluate_epoch()`; callbacks do the rest.

Everything a step uses is an explicit argument. Randomness (data order, augmentation, dropout) is seeded from
(seed, epoch) at the start of every epoch, so an epoch does the same work whether the run went straight
through or was resumed from a checkpoint.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from imgclf.training.callbacks import Callback
from imgclf.training.optim import LRSchedule, current_lr


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

    def counters(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "stop_reason": self.stop_reason,
            "phase": self.phase,
        }

    def restore_counters(self, counters: dict[str, Any]) -> None:
        self.epoch = int(counters["epoch"])
        self.history = [dict(row) for row in counters["history"]]
        self.best_epoch = counters["best_epoch"]
        self.best_metric = counters["best_metric"]
        self.stop_reason = counters["stop_reason"]

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs or self.stop_reason is not None


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float


BatchHook = Callable[[int, torch.Tensor, int], None]


def seed_epoch(seed: int, epoch: int, loader: DataLoader | None = None) -> None:
    """Seed every RNG (torch, numpy, random, the loader's order and worker seeds) from (seed, epoch)."""
    derived = (seed * 1_000_003 + epoch) % (2**63)
    torch.manual_seed(derived)
    np.random.seed(derived % (2**32))
    random.seed(derived)
    if loader is not None and loader.generator is not None:
        loader.generator.manual_seed(derived)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    *,
    schedule: LRSchedule,
    grad_clip: float | None = None,
    frozen_norms: Sequence[nn.Module] = (),
    on_batch: BatchHook | None = None,
) -> EpochResult:
    """One pass over `loader`: forward, loss, backward, (clip), step, schedule step.

    `frozen_norms` stay in eval mode, so the running statistics of a frozen backbone do not move.
    """
    model.train()
    for norm in frozen_norms:
        norm.eval()
    start = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for index, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        schedule.after_step()
        # Accumulate on the device: calling .item() here would be a CPU-GPU sync point every step.
        batch = targets.shape[0]
        total_loss += loss.detach() * batch
        correct += (logits.detach().argmax(1) == targets).sum()
        seen += batch
        if on_batch is not None:
            on_batch(index, loss.detach(), batch)
    seconds = time.perf_counter() - start
    return EpochResult(_mean(total_loss, seen), _mean(correct, seen), seen, seconds)


@torch.no_grad()
def evaluate_epoch(model: nn.Module, loader: DataLoader, device: torch.device) -> EpochResult:
    """Mean cross-entropy (no label smoothing, no class weights) and accuracy over `loader`."""
    model.eval()
    start = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        total_loss += F.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
        seen += targets.shape[0]
    return EpochResult(_mean(total_loss, seen), _mean(correct, seen), seen, time.perf_counter() - start)


def fit(
    state: FitState,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    loss_fn: nn.Module,
    device: torch.device,
    seed: int,
    monitor: str = "val_loss",
    grad_clip: float | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitState:
    """Train from `state.epoch` until `state.epochs` or until a callback sets `state.stop_reason`.

    Args:
        state: model, optimizer, schedule and counters (fresh, or restored from a checkpoint).
        train_loader: shuffled, augmented training data.
        val_loader: validation data; selects the model and drives early stopping, never the test split.
        loss_fn: training loss.
        device: where the model lives.
        seed: base seed; epoch e is seeded from (seed, e).
        monitor: history column passed to a plateau schedule.
        grad_clip: max gradient norm, or None.
        callbacks: called in order at each hook.

    Returns:
        The same `state`, advanced.
    """
    for callback in callbacks:
        callback.on_fit_start(state)
    while not state.finished:
        epoch = state.epoch + 1
        seed_epoch(seed, epoch, train_loader)
        for callback in callbacks:
            callback.on_epoch_start(state)

        def on_batch(index: int, loss: torch.Tensor, batch: int) -> None:
            for callback in callbacks:
                callback.on_batch_end(state, index, loss, batch)

        lr = current_lr(state.optimizer)
        train = train_one_epoch(
            state.model,
            train_loader,
            state.optimizer,
            loss_fn,
            device,
            schedule=state.schedule,
            grad_clip=grad_clip,
            frozen_norms=state.frozen_norms,
            on_batch=on_batch,
        )
        val = evaluate_epoch(state.model, val_loader, device)
        row = {
            "epoch": epoch,
            "phase": state.phase or "train",
            "train_loss": train.loss,
            "train_acc": train.accuracy,
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "lr": lr,
            "seconds": round(train.seconds + val.seconds, 3),
            "images_per_s": round(train.images / max(train.seconds, 1e-9), 1),
        }
        state.schedule.after_epoch(row[monitor])
        state.history.append(row)
        state.epoch = epoch
        for callback in callbacks:
            callback.on_epoch_end(state, row)
    for callback in callbacks:
        callback.on_fit_end(state)
    return state


def _mean(total: torch.Tensor, count: int) -> float:
    return float(total.item()) / max(count, 1)
