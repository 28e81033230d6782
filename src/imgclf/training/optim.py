"""Factories for the optimizer, the learning-rate schedule and the loss; the LR range test (LR finder) and the
timer of a training step (what a time budget buys)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau, StepLR
from torch.utils.data import DataLoader

from imgclf.device import Compute
from imgclf.errors import ConfigError
from imgclf.models.finetune import param_groups
from imgclf.progress import NO_PROGRESS, Progress

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "step", "plateau", "none")

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "LRFinderResult",
    "LRSchedule",
    "PlannedCosine",
    "build_loss",
    "build_optimizer",
    "build_schedule",
    "current_lr",
    "find_lr",
    "planned_schedule",
    "seconds_per_step",
    "train_step",
]

log = logging.getLogger(__name__)


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    layer_decay: float | None = None,
) -> Optimizer:
    """Create an optimizer over all of `model`'s parameters (frozen ones included, for later phases).

    Biases and normalisation weights get no weight decay; with `layer_decay`, each layer group's LR is
    lr * layer_decay ** (distance from the head) (timm's grouping, `models.finetune.param_groups`).

    Args:
        name: adamw | adam | sgd.
        model: the network.
        lr: peak learning rate of the head.
        weight_decay: decay for weights of dimension >= 2.
        momentum: sgd momentum.
        nesterov: sgd Nesterov momentum.
        layer_decay: per-layer LR factor below the head, or None.

    Example:
        >>> from imgclf.models.small_cnn import SmallCNN
        >>> optimizer = build_optimizer("sgd", SmallCNN(num_classes=3, in_chans=1), lr=0.1, weight_decay=5e-4)
        >>> type(optimizer).__name__, sorted({group["weight_decay"] for group in optimizer.param_groups})
        ('SGD', [0.0, 0.0005])
    """
    factories = {
        "adamw": lambda groups: AdamW(groups, lr=lr),
        "adam": lambda groups: Adam(groups, lr=lr),
        "sgd": lambda groups: SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0),
    }
    if name not in factories:
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}; received '{name}'")
    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return factories[name](groups)


@dataclass
class LRSchedule:
    """A torch LR scheduler and when to step it: after every optimiser step, or once per epoch."""

    scheduler: LRScheduler | ReduceLROnPlateau | None
    interval: Literal["step", "epoch"]

    def after_step(self) -> None:
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, metric: float) -> None:
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(metric)
        elif self.scheduler is not None and self.interval == "epoch":
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)
            # Schedulers multiply the optimizer's LR; make it match the restored step count exactly.
            if isinstance(self.scheduler, LRScheduler):
                for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                    group["lr"] = lr


def build_schedule(
    name: str,
    optimizer: Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    step_size: int = 10,
    gamma: float = 0.1,
    plateau_patience: int = 3,
    mode: Literal["min", "max"] = "min",
) -> LRSchedule:
    """Create the learning-rate schedule.

    Args:
        name: cosine (linear warmup, then cosine decay to 0, stepped per batch) | step | plateau | none.
        optimizer: the optimizer whose LR is scheduled.
        epochs: planned epochs.
        steps_per_epoch: optimiser steps per epoch.
        warmup_epochs: cosine: length of the linear warmup from lr/100 (at most a fifth of the run).
        step_size: step: epochs between decays.
        gamma: step, plateau: decay factor.
        plateau_patience: plateau: epochs without improvement before a decay.
        mode: plateau: whether the monitored metric should go down (min) or up (max).
    """
    if name == "cosine":
        total = max(1, epochs * steps_per_epoch)
        # Warmup never takes more than a fifth of a (short) run, so the peak LR is always reached.
        asked = round(warmup_epochs * steps_per_epoch)
        warmup = min(asked, total // 5)
        if warmup < asked:
            log.warning(
                "warmup shortened to %.2g epochs (%d steps, a fifth of the %d epochs of this phase) from "
                "train.warmup_epochs %g, so that the peak learning rate is reached",
                warmup / max(steps_per_epoch, 1),
                warmup,
                epochs,
                warmup_epochs,
            )
        return LRSchedule(LambdaLR(optimizer, _warmup_cosine(total, warmup)), "step")
    if name == "step":
        return LRSchedule(StepLR(optimizer, step_size=step_size, gamma=gamma), "epoch")
    if name == "plateau":
        return LRSchedule(ReduceLROnPlateau(optimizer, mode=mode, factor=gamma, patience=plateau_patience), "epoch")
    if name == "none":
        return LRSchedule(None, "epoch")
    raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}; received '{name}'")


class PlannedCosine:
    """Linear warmup, then cosine decay to 0 at `total` steps, where `total` can be re-planned while the run goes
    (a time budget re-estimates the steps that fit as it measures them). A plain object, not a closure, so that
    LambdaLR's state_dict saves `total` and `warmup` with the step count and a resumed run continues the plan."""

    def __init__(self, total: int, warmup: int, start_factor: float = 0.01) -> None:
        self.total, self.warmup, self.start_factor = max(1, total), warmup, start_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_schedule(optimizer: Optimizer, *, total_steps: int, warmup_steps: int) -> LRSchedule:
    """Warmup + cosine over a number of steps that `PlannedCosine.total` (`schedule.scheduler.lr_lambdas[0]`) may
    change later: the time-budget schedule (`training/budget.py`)."""
    return LRSchedule(LambdaLR(optimizer, PlannedCosine(total_steps, warmup_steps)), "step")


def _warmup_cosine(total_steps: int, warmup_steps: int, start_factor: float = 0.01):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_factor + (1 - start_factor) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def current_lr(optimizer: Optimizer) -> float:
    """The head's LR: the largest group LR (lower layers get less with layer-wise decay)."""
    return max(float(group["lr"]) for group in optimizer.param_groups)


def build_loss(*, label_smoothing: float, class_counts: list[int] | None = None) -> nn.CrossEntropyLoss:
    """Cross-entropy with label smoothing; with `class_counts`, weighted by inverse class frequency
    (weight_c = N / (C * n_c), scikit-learn's "balanced": each class contributes equally in total, and the
    average weight per training image is 1)."""
    weight = None
    if class_counts is not None:
        counts = torch.tensor(class_counts, dtype=torch.float32).clamp(min=1)
        weight = counts.sum() / (len(class_counts) * counts)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class LRFinderResult:
    """The LR range test: loss per learning rate, its smoothed curve, and the suggested LR."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    method: str
    stopped: str  # why the ramp ended


def find_lr(
    model: nn.Module,
    loader: DataLoader,
    optimizer: Optimizer,
    loss_fn: nn.Module,
    compute: Compute,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    beta: float = 0.9,
    diverge: float = 4.0,
    frozen_norms: Sequence[nn.Module] = (),
    progress: Progress = NO_PROGRESS,
) -> LRFinderResult:
    """LR range test (Smith 2017; fastai's lr_find): train with an exponentially growing LR and record the loss.

    Recipe:
    1. save the model and optimizer state;
    2. for up to `num_steps` batches (cycling through `loader`), set lr = start_lr * (end_lr/start_lr)**(i/(n-1))
       (times each group's layer scale), take one optimizer step, record the loss;
    3. smooth the losses with a bias-corrected exponential moving average (`beta`); stop early when the smoothed
       loss exceeds `diverge` times its minimum, or is not finite;
    4. restore the saved state, so the model and optimizer are exactly as before;
    5. suggest the LR at the steepest descent of the smoothed loss (most negative slope against log LR),
       looked for before the loss minimum: the LR where the loss falls fastest.

    Returns:
        The curve and the suggestion.
    """
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, best = 0.0, math.inf
    stopped = f"reached {end_lr:g} after {num_steps} steps"
    batches = _cycle(loader)
    stack = contextlib.ExitStack()
    model.train()
    for norm in frozen_norms:
        norm.eval()
    try:
        task = stack.enter_context(progress.task("LR range test", total=num_steps))
        for step in range(num_steps):
            lr = start_lr * (end_lr / start_lr) ** (step / max(1, num_steps - 1))
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale
            value = train_step(model, next(batches), optimizer, loss_fn, compute)
            if not math.isfinite(value):
                stopped = f"loss became {value} at lr {lr:.2e}"
                break
            average = beta * average + (1 - beta) * value
            smooth = average / (1 - beta ** (step + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            best = min(best, smooth)
            task.advance(lr=f"{lr:.1e}", loss=f"{smooth:.4f}")
            if step > 10 and smooth > diverge * best:
                stopped = f"diverged at lr {lr:.2e} (smoothed loss {smooth:.3g} > {diverge:g} x minimum {best:.3g})"
                break
    finally:
        stack.close()
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    if len(lrs) < 5:
        raise ConfigError(
            f"the LR finder needs at least 5 steps before the loss diverges; it got {len(lrs)} "
            f"({stopped}); lower start_lr"
        )
    return LRFinderResult(lrs, losses, smoothed, _steepest_descent(lrs, smoothed), "steepest descent", stopped)


def seconds_per_step(
    model: nn.Module, loader: DataLoader, optimizer: Optimizer, loss_fn: nn.Module, compute: Compute, *, steps: int
) -> float:
    """The mean seconds of one training step of `model` on `loader`'s batches (cycled), timed over `steps` steps
    after an untimed first one (its one-off costs: the loader's start, the kernels' first choice). The steps train
    the model: give it one that is thrown away afterwards."""
    batches = _cycle(loader)
    model.train()
    train_step(model, next(batches), optimizer, loss_fn, compute)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, next(batches), optimizer, loss_fn, compute)  # .item() in it: each step has finished
    return (time.perf_counter() - start) / steps


def train_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: Optimizer,
    loss_fn: nn.Module,
    compute: Compute,
) -> float:
    """One optimizer step on `batch` at the optimizer's current LR; returns the loss before the step."""
    images, targets = batch
    images = images.to(compute.device, memory_format=compute.memory_format)
    targets = targets.to(compute.device)
    with compute.autocast():
        loss = loss_fn(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _steepest_descent(lrs: list[float], smoothed: list[float]) -> float:
    values = np.asarray(smoothed)
    logs = np.log10(np.asarray(lrs))
    lowest = int(values.argmin())
    skip = max(1, len(values) // 10)  # the first points carry the EMA warm-up noise
    if lowest <= skip + 1:
        return float(lrs[lowest]) / 10  # no falling region: stay well below the minimum
    slopes = np.gradient(values[: lowest + 1], logs[: lowest + 1])
    steepest = skip + int(slopes[skip:].argmin())
    return float(lrs[steepest])


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader
