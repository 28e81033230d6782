"""Factories for the optimizer, the learning-rate schedule and the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau, StepLR

from imgclf.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "step", "plateau", "none")


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> Optimizer:
    """Create an optimizer; biases and normalisation weights get no weight decay (timm's grouping).

    Args:
        name: adamw | adam | sgd.
        model: the network whose trainable parameters are optimised.
        lr: learning rate.
        weight_decay: decay for weights of dimension >= 2.
        momentum: sgd momentum.
        nesterov: sgd Nesterov momentum.

    Example:
        >>> build_optimizer("sgd", model, lr=0.1, weight_decay=5e-4)
    """
    groups = param_groups_weight_decay(model, weight_decay)
    factories = {
        "adamw": lambda: AdamW(groups, lr=lr),
        "adam": lambda: Adam(groups, lr=lr),
        "sgd": lambda: SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0),
    }
    if name not in factories:
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}; received '{name}'")
    return factories[name]()


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
        warmup = min(round(warmup_epochs * steps_per_epoch), total // 5)
        return LRSchedule(LambdaLR(optimizer, _warmup_cosine(total, warmup)), "step")
    if name == "step":
        return LRSchedule(StepLR(optimizer, step_size=step_size, gamma=gamma), "epoch")
    if name == "plateau":
        return LRSchedule(ReduceLROnPlateau(optimizer, mode=mode, factor=gamma, patience=plateau_patience), "epoch")
    if name == "none":
        return LRSchedule(None, "epoch")
    raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}; received '{name}'")


def _warmup_cosine(total_steps: int, warmup_steps: int, start_factor: float = 0.01):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_factor + (1 - start_factor) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def current_lr(optimizer: Optimizer) -> float:
    """LR of the first parameter group (the others follow it unless layer-wise rates are set)."""
    return float(optimizer.param_groups[0]["lr"])


def build_loss(*, label_smoothing: float, class_counts: list[int] | None = None) -> nn.CrossEntropyLoss:
    """Cross-entropy with label smoothing; with `class_counts`, weighted by inverse class frequency
    (weight_c = N / (C * n_c), scikit-learn's "balanced": each class contributes equally in total, and the
    average weight per training image is 1)."""
    weight = None
    if class_counts is not None:
        counts = torch.tensor(class_counts, dtype=torch.float32).clamp(min=1)
        weight = counts.sum() / (len(class_counts) * counts)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
