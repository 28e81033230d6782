"""The training loop: `fit()` runs epochs of `train_one_epoch()` and `evaluate_epoch()`; callbacks do the rest.

Everything a step uses is an explicit argument. Randomness (data order, augmentation, dropout) is seeded from
(seed, epoch) at the start of every epoch, so an epoch does the same work whether the run went straight
through or was resumed from a checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from imgclf.device import Compute
from imgclf.errors import TrainingDiverged
from imgclf.training import distributed
from imgclf.training.distributed import SINGLE, Group
from imgclf.training.ema import WeightAverage
from imgclf.training.optim import LRSchedule, current_lr
from imgclf.training.state import Callback, EpochProgress, FitState

__all__ = ["BatchHook", "EpochResult", "MixFn", "StopCheck", "evaluate_epoch", "fit", "seed_epoch", "train_one_epoch"]


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float
    loss_se: float = float("nan")  # standard error of the mean loss over the images


BatchHook = Callable[[int, torch.Tensor, int], None]
MixFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
StopCheck = Callable[[], "str | None"]


def seed_epoch(seed: int, epoch: int, loader: Iterable | None = None, rank: int = 0) -> None:
    """Seed every RNG (torch, numpy, random, the loader's order and worker seeds) from (seed, epoch).

    With several processes the data order stays the same on all of them (each takes its slice of it), while the
    augmentation's random draws (torch's generator) are mixed with the process's `rank`, so that processes do not
    crop and flip their images alike.
    """
    derived = (seed * 1_000_003 + epoch) % (2**63)
    mixed = derived if rank == 0 else (derived * 1_000_033 + rank) % (2**63)
    torch.manual_seed(mixed)
    np.random.seed(mixed % (2**32))
    random.seed(mixed)
    if getattr(loader, "generator", None) is not None:  # the order (shared), or only the workers' seeds (mixed)
        loader.generator.manual_seed(derived if getattr(loader, "shared_order", True) else mixed)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: Optimizer,
    loss_fn: nn.Module,
    compute: Compute,
    *,
    schedule: LRSchedule,
    grad_clip: float | None = None,
    frozen_norms: Sequence[nn.Module] = (),
    mix: MixFn | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: EpochProgress | None = None,
    should_stop: StopCheck | None = None,
    on_batch: BatchHook | None = None,
    img_size: int | None = None,
    group: Group = SINGLE,
    max_steps: Callable[[], int | None] | None = None,
    ema: WeightAverage | None = None,
) -> tuple[EpochProgress, bool]:
    """One pass over `loader`: (mix), forward under autocast, loss, backward, (unscale, clip), step, schedule.

    Args:
        progress: where a resumed epoch stands (the loader then starts at its `step`), or None for a new epoch.
        should_stop: checked after every batch; a reason (a signal's name, too many bad images) ends the epoch
            early, after that batch.
        frozen_norms: stay in eval mode, so the running statistics of a frozen backbone do not move.
        mix: MixUp/CutMix; targets become mixed one-hot vectors and accuracy counts their largest class.
        img_size: train on batches downscaled to this size (progressive resizing); None = as the loader gives.
        group: the processes training together (torchrun): a non-finite loss or a stop request on any of them
            stops all after the same batch. The returned sums are this process's own.
        max_steps: asked before each batch: the epoch ends (complete) when its batch index reaches it (a time
            budget's plan); None = the whole loader.
        ema: a moving average of the weights, updated after every optimizer step.

    Returns:
        (the epoch's progress, whether it ran to the end).

    Raises:
        TrainingDiverged: the loss is not finite; the optimizer has not taken that step.
    """
    model.train()
    for norm in frozen_norms:
        norm.eval()
    device = compute.device
    progress = progress or EpochProgress()
    start = time.perf_counter()
    # Continue the sums of a resumed epoch, in float64: the additions happen in the same order as in an
    # uninterrupted epoch, so its history row comes out identical.
    total_loss = torch.tensor(progress.loss_sum, device=device, dtype=torch.float64)
    total_ce = torch.tensor(progress.ce_sum, device=device, dtype=torch.float64)
    correct = torch.tensor(progress.correct, device=device, dtype=torch.long)
    seen = progress.seen
    batches = _iter_from(loader, progress.step)
    if progress.rng is not None:  # continue the augmentation stream where the stopped run left it
        torch.set_rng_state(torch.tensor(progress.rng, dtype=torch.uint8))
    index, stopped = progress.step - 1, False
    for index, (images, targets) in enumerate(batches, start=progress.step):
        limit = max_steps() if max_steps is not None else None
        if limit is not None and index >= limit:  # the planned steps are done: the epoch ends here
            index -= 1
            break
        images, targets = _to_device(images, targets, compute, img_size)
        if mix is not None:
            images, targets = mix(images, targets)
        with compute.autocast():
            logits = model(images)
            loss = loss_fn(logits, targets)
        _stop_if_diverged(loss, group, device, batch=index + 1, optimizer=optimizer)
        _backward_and_step(loss, model, optimizer, scaler=scaler, grad_clip=grad_clip)
        schedule.after_step()
        if ema is not None:
            ema.update(getattr(model, "module", model))  # the unwrapped model's weights (DDP keeps it as .module)
        # Accumulate on the device: calling .item() here would be a CPU-GPU sync point every step.
        batch = targets.shape[0]
        hard = targets.argmax(1) if targets.ndim == 2 else targets
        total_loss += loss.detach().double() * batch
        # the objective is not comparable with val loss under label smoothing, class weights or MixUp/CutMix: the
        # plain cross-entropy of the same logits (against the mixed targets under MixUp) is, as far as it goes
        total_ce += F.cross_entropy(logits.detach().float(), targets, reduction="sum").double()
        correct += (logits.detach().argmax(1) == hard).sum()
        seen += batch
        if on_batch is not None:
            on_batch(index, loss.detach(), batch)
        if should_stop is not None and distributed.any_rank(group, should_stop() is not None, device):
            stopped = True
            break
    if hasattr(batches, "close"):
        batches.close()  # a stopped epoch shuts its loader workers down now, not at garbage collection
    done = EpochProgress(
        step=index + 1,
        loss_sum=float(total_loss.item()),
        ce_sum=float(total_ce.item()),
        correct=int(correct.item()),
        seen=seen,
        seconds=progress.seconds + time.perf_counter() - start,
        lr=progress.lr,
        rng=torch.get_rng_state().tolist(),
    )
    return done, not stopped


def _to_device(
    images: torch.Tensor, targets: torch.Tensor, compute: Compute, img_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on the compute device, in its memory format, downscaled to `img_size` when given (progressive
    resizing)."""
    images = images.to(compute.device, non_blocking=True, memory_format=compute.memory_format)
    targets = targets.to(compute.device, non_blocking=True)
    if img_size is not None and images.shape[-1] != img_size:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", antialias=True)
        images = images.contiguous(memory_format=compute.memory_format)
    return images, targets


def _stop_if_diverged(
    loss: torch.Tensor, group: Group, device: torch.device, *, batch: int, optimizer: Optimizer
) -> None:
    """Raise `TrainingDiverged` when the loss is not finite on this process or another.

    note: a CPU-GPU sync point (and an all-reduce under torchrun: a NaN on one process would reach every process's
    weights through the averaged gradients), but a NaN must stop training before the weights."""
    if distributed.any_rank(group, ~torch.isfinite(loss.detach()), device):
        value = loss.item() if not torch.isfinite(loss) else "non-finite on another process"
        raise TrainingDiverged(
            f"the training loss became {value} at batch {batch} (lr {current_lr(optimizer):.2e}); "
            "the checkpoints hold the last good epoch. Try a lower --lr (a tenth), --set train.grad_clip=1.0, "
            "or --set train.precision=fp32"
        )


def _backward_and_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: Optimizer,
    *,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> None:
    """Backward, (unscale, clip), optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16 on CUDA: scale the loss so small gradients do not underflow
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _iter_from(loader: Iterable, step: int):
    """An iterator over `loader` that starts at batch `step` of the epoch's order."""
    if step == 0:
        return iter(loader)
    if not hasattr(loader, "iter_from"):
        raise TypeError(f"{type(loader).__name__} cannot start an epoch at batch {step}")
    return loader.iter_from(step)


@torch.no_grad()
def evaluate_epoch(model: nn.Module, loader: Iterable, compute: Compute, group: Group = SINGLE) -> EpochResult:
    """Mean cross-entropy (no label smoothing, no class weights), its standard error, and accuracy over `loader`
    (under torchrun: over every process's slice of the images, their sums added)."""
    model.eval()
    device = compute.device
    start = time.perf_counter()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    total_square = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True, memory_format=compute.memory_format)
        targets = targets.to(device, non_blocking=True)
        with compute.autocast():
            logits = model(images)
        losses = F.cross_entropy(logits.float(), targets, reduction="none").double()
        total_loss += losses.sum()
        total_square += (losses * losses).sum()
        correct += (logits.argmax(1) == targets).sum()
        seen += targets.shape[0]
    loss_sum, square_sum, right, seen = distributed.sum_over(
        group, [total_loss.item(), total_square.item(), correct.item(), seen], device
    )
    seen = int(seen)
    mean = loss_sum / max(seen, 1)
    variance = max(0.0, square_sum / max(seen, 1) - mean * mean) * seen / max(seen - 1, 1)
    se = math.sqrt(variance / seen) if seen > 1 else float("nan")
    return EpochResult(mean, right / max(seen, 1), seen, time.perf_counter() - start, se)


def fit(
    state: FitState,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    loss_fn: nn.Module,
    compute: Compute,
    seed: int,
    monitor: str = "val_loss",
    grad_clip: float | None = None,
    mix: MixFn | None = None,
    should_stop: StopCheck | None = None,
    callbacks: Sequence[Callback] = (),
    resolution: Callable[[int], int] | None = None,
    group: Group = SINGLE,
    step_limit: Callable[[], int | None] | None = None,
) -> FitState:
    """Train from `state.epoch` (and `state.progress`, mid-epoch) until `state.epochs`, until a callback sets
    `state.stop_reason`, or until `should_stop` gives a reason (then `state.interrupted_by` is set and the
    callbacks' `on_interrupt` save a checkpoint to resume from).

    Args:
        state: model, optimizer, schedule and counters (fresh, or restored from a checkpoint).
        train_loader: shuffled, augmented training data.
        val_loader: validation data; selects the model and drives early stopping, never the test split.
        loss_fn: training loss.
        compute: device, autocast dtype and memory format.
        seed: base seed; epoch e is seeded from (seed, e).
        monitor: history column passed to a plateau schedule.
        grad_clip: max gradient norm, or None.
        mix: MixUp/CutMix applied to each training batch, or None.
        should_stop: returns a reason when training should stop after the current batch.
        callbacks: called in order at each hook.
        resolution: epoch -> training image size (progressive resizing: `data.transforms.progressive_size`);
            None trains at the loader's size. Validation always runs at the loader's (full) size.
        group: the processes training together (torchrun; `training.distributed`): each runs this loop on its
            slice of the data, `state.forward` (DDP) averages the gradients, the epoch's sums are added over the
            processes so that every process writes the same history row and takes the same decisions.
        step_limit: asked before each batch (see `train_one_epoch`'s max_steps): a time budget's plan.

    With `state.ema` (a `WeightAverage`), the averaged weights are updated after every step and validated after
    every epoch too: the row gets `val_loss_ema` and `val_acc_ema`.

    Returns:
        The same `state`, advanced.
    """
    for callback in callbacks:
        callback.on_fit_start(state)
    if state.progress is not None and group.enabled:  # a resumed epoch: this process's generator, and its sums
        state.progress = _own_share(state.progress, group.rank)
    while not state.finished:
        epoch = state.epoch + 1
        seed_epoch(seed, epoch, train_loader, rank=group.rank)
        img_size = resolution(epoch) if resolution is not None else None
        for callback in callbacks:
            callback.on_epoch_start(state)

        def on_batch(index: int, loss: torch.Tensor, batch: int) -> None:
            for callback in callbacks:
                callback.on_batch_end(state, index, loss, batch)

        progress = state.progress or EpochProgress(lr=current_lr(state.optimizer))
        progress, complete = train_one_epoch(
            state.forward or state.model,
            train_loader,
            state.optimizer,
            loss_fn,
            compute,
            schedule=state.schedule,
            grad_clip=grad_clip,
            frozen_norms=state.frozen_norms,
            mix=mix,
            scaler=state.scaler,
            progress=progress,
            should_stop=should_stop,
            on_batch=on_batch,
            img_size=img_size,
            group=group,
            max_steps=step_limit,
            ema=state.ema,
        )
        progress = _over_processes(progress, group, compute.device, with_rng=not complete)
        if not complete:
            reason = should_stop() if should_stop else None
            state.progress, state.interrupted_by = progress, distributed.first_of(group, reason)
            for callback in callbacks:
                callback.on_interrupt(state)
            return state
        state.progress = None
        val = evaluate_epoch(state.model, val_loader, compute, group)
        averaged = evaluate_epoch(state.ema.module, val_loader, compute, group) if state.ema is not None else None
        row = _history_row(epoch, state.phase or "train", progress, val, averaged, img_size)
        state.schedule.after_epoch(row[monitor])
        state.history.append(row)
        state.epoch = epoch
        for callback in callbacks:
            callback.on_epoch_end(state, row)
    for callback in callbacks:
        callback.on_fit_end(state)
    return state


def _history_row(
    epoch: int,
    phase: str,
    progress: EpochProgress,
    val: EpochResult,
    averaged: EpochResult | None,
    img_size: int | None,
) -> dict:
    """The epoch's row of history.csv: training sums, validation (and the weight average's), time, image size."""
    row = {
        "epoch": epoch,
        "phase": phase,
        "train_loss": progress.loss,
        "train_ce": progress.cross_entropy,
        "train_acc": progress.accuracy,
        "val_loss": val.loss,
        "val_loss_se": val.loss_se,
        "val_acc": val.accuracy,
        "val_images": val.images,
        "lr": progress.lr,
        "seconds": round(progress.seconds + val.seconds + (averaged.seconds if averaged else 0.0), 3),
        "images_per_s": round(progress.seen / max(progress.seconds, 1e-9), 1),
        "steps": progress.step,
        "train_images": progress.seen,
    }
    if img_size is not None:
        row["img_size"] = img_size
    if averaged is not None:
        row["val_loss_ema"], row["val_acc_ema"] = averaged.loss, averaged.accuracy
    return row


def _over_processes(progress: EpochProgress, group: Group, device: torch.device, *, with_rng: bool) -> EpochProgress:
    """The epoch's sums added over the processes (the same on each), and for a stopped epoch every process's
    generator state (the checkpoint keeps them all)."""
    if not group.enabled:
        return progress
    loss_sum, ce_sum, correct, seen = distributed.sum_over(
        group, [progress.loss_sum, progress.ce_sum, progress.correct, progress.seen], device
    )
    return replace(
        progress,
        loss_sum=loss_sum,
        ce_sum=ce_sum,
        correct=int(correct),
        seen=int(seen),
        rng_by_rank=distributed.gather(group, progress.rng) if with_rng else None,
    )


def _own_share(progress: EpochProgress, rank: int) -> EpochProgress:
    """Where this process resumes a stopped epoch: the saved sums are every process's together, so rank 0 continues
    them and the others start from zero (the epoch's end adds them up again); each takes back its own generator."""
    rng = progress.rng_by_rank[rank] if progress.rng_by_rank else progress.rng
    if rank == 0:
        return replace(progress, rng=rng)
    return replace(progress, loss_sum=0.0, ce_sum=0.0, correct=0, seen=0, rng=rng)
