"""Train to a time budget (`--time 10m`): the learning-rate schedule is laid over the number of optimizer steps that
fit in the budget, measured as the run goes, so the run ends on time with its schedule complete (a run stopped by
the clock in the middle of a cosine schedule is worse than a shorter schedule run to its end).

1. The budget counts from the first step to the end of the last validation (training and validation; not the
   scan, the cache build, the final test evaluation or the report). A resumed run continues the same budget.
2. After the first `PROBE_STEPS` steps of the budgeted phase (the last one: after a frozen phase, if any) the
   seconds per step are measured and the steps that fit are planned: `R = (T - v) / (s + v / P)` for T seconds
   left, s seconds per step, v seconds per validation (estimated from the training speed until one is measured)
   and P steps per epoch; the schedule (`optim.PlannedCosine`: warmup, then cosine to 0) is laid over them.
3. The plan is made again every `REPLAN_STEPS` steps and after every validation, from the measured speeds, so a
   slower or faster machine (or a busy one) still ends on time; `train.epochs` stays an upper bound.
4. The epoch that reaches the planned step ends there (a partial last epoch), is validated, and the run stops with
   the schedule at its end (LR 0): `stop_reason` says "time budget", history.csv records each epoch's elapsed
   budget and planned steps.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from imgclf.training import distributed
from imgclf.training.optim import PlannedCosine
from imgclf.training.state import Callback, FitState

__all__ = ["TimeBudget", "budget_cap", "budget_epochs", "width_for_budget"]

log = logging.getLogger(__name__)

PROBE_STEPS = 10  # steps timed before the first plan (the first step, with its one-off costs, is not counted)
REPLAN_STEPS = 25  # steps between two plans within an epoch
VALIDATION_COST = 0.5  # an unmeasured validation batch (2x the batch, no backward) ~ half a training step
SMALL_CNN_WIDTHS = (32, 64)  # model.width: auto: small_cnn's default, and its width for budgets that buy many epochs
WIDEN_FROM_EPOCHS = 30  # ... when the budget buys this many epochs of the default width
WIDEN_FROM_IMAGES = 10_000  # ... on a training set this large (where it was measured)


class TimeBudget(Callback):
    """Fits the last phase's schedule to `seconds` of training and stops the run when its planned steps are done.

    Args:
        seconds: the budget.
        steps_per_epoch: optimizer steps of a full epoch.
        val_batches: batches of a validation pass (for the first estimate of its cost).
        warmup_epochs: the schedule's warmup, at most a fifth of the planned steps.
        group: the processes training together (torchrun): rank 0's clock plans for all.
    """

    def __init__(
        self,
        seconds: float,
        *,
        steps_per_epoch: int,
        val_batches: int,
        warmup_epochs: float,
        group: distributed.Group = distributed.SINGLE,
    ) -> None:
        self.seconds = seconds
        self.group = group  # under torchrun every process follows rank 0's plan (same steps, or DDP would hang)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.val_batches = val_batches
        self.warmup_epochs = warmup_epochs
        self.clock = time.perf_counter
        self._session_start = 0.0
        self._elapsed_before = 0.0  # budget spent by earlier sessions of the run (resume)
        self._train_seconds = 0.0  # timed training steps of the budgeted phase, this session
        self._timed_steps = 0
        self._last_batch_end: float | None = None
        self._val_seconds: list[float] = []  # measured validations (their mean plans: one slow pass is noise)
        self._epoch_start_step = 0
        self._timed_plan: PlannedCosine | None = None  # the phase whose steps the timing counts

    # --- what fit asks --------------------------------------------------------------------------------------

    def epoch_step_limit(self, state: FitState) -> int | None:
        """The last step index + 1 this epoch may reach (None: no limit): the plan's end, minus the steps the
        phase had done when the epoch began."""
        plan = self._plan(state)
        if plan is None:
            return None
        return max(0, plan.total - self._epoch_start_step)

    # --- hooks --------------------------------------------------------------------------------------------

    def on_fit_start(self, state: FitState) -> None:
        record = state.budget or {}
        self._elapsed_before = float(record.get("elapsed", 0.0))
        self._session_start = self.clock()
        state.budget = {"seconds": self.seconds, "elapsed": self._elapsed_before, **record}

    def on_epoch_start(self, state: FitState) -> None:
        # a resumed epoch has taken some of its steps before the checkpoint: the epoch began that many steps ago
        self._epoch_start_step = _phase_steps(state) - (state.progress.step if state.progress is not None else 0)
        self._last_batch_end = None  # the epoch's first step carries one-off costs (loader start): not timed

    def on_batch_end(self, state: FitState, index: int, loss: torch.Tensor, batch_size: int) -> None:
        now = self.clock()
        plan = self._plan(state)
        if plan is not self._timed_plan:  # a new phase (after a frozen one): its steps have another speed
            self._timed_plan, self._train_seconds, self._timed_steps = plan, 0.0, 0
        elif self._last_batch_end is not None:
            self._train_seconds += now - self._last_batch_end
            self._timed_steps += 1
        self._last_batch_end = now
        if plan is None:
            if self.elapsed() >= self.seconds:  # an earlier (frozen) phase used the whole budget
                state.stop_reason = f"time budget of {_duration(self.seconds)} spent before the last phase"
            return
        if not self._timed_steps:
            return
        unplanned = state.budget.get("first_estimate") is None
        if (unplanned and self._timed_steps >= PROBE_STEPS) or (not unplanned and index % REPLAN_STEPS == 0):
            if loss.device.type == "cuda":
                torch.cuda.synchronize()  # note: a sync point, once per plan, so the clock sees finished steps
            self._replan(state, plan, steps_this_epoch=index + 1)

    def on_epoch_end(self, state: FitState, row: dict[str, Any]) -> None:
        if self._last_batch_end is not None and self._plan(state) is not None:
            self._val_seconds.append(self.clock() - self._last_batch_end)
        plan = self._plan(state)
        # an epoch the plan cut short ends the run: its validation was the last one the budget holds
        done = plan is not None and _phase_steps(state) >= plan.total
        if plan is not None and self._timed_steps and not done:
            self._replan(state, plan, steps_this_epoch=0)
            done = _phase_steps(state) >= plan.total  # the new plan has no room for another epoch
        row["budget_s"] = round(self.elapsed(), 2)
        row["planned_steps"] = plan.total if plan is not None else ""
        state.budget["elapsed"] = self.elapsed()
        over = distributed.any_rank(self.group, done or self.elapsed() >= self.seconds, torch.device("cpu"))
        if over and not state.finished:
            state.stop_reason = (
                f"time budget of {_duration(self.seconds)}: {_phase_steps(state)} steps of the last phase in "
                f"{self.elapsed():.1f} s, the schedule complete (first estimate {state.budget.get('first_estimate')} "
                "steps)"
            )
            log.info(state.stop_reason)

    def on_interrupt(self, state: FitState) -> None:
        state.budget["elapsed"] = self.elapsed()

    # --- the plan -----------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self._elapsed_before + self.clock() - self._session_start

    def _plan(self, state: FitState) -> PlannedCosine | None:
        """The budgeted phase's schedule (the last phase's, a PlannedCosine), or None in an earlier phase."""
        scheduler = state.schedule.scheduler if state.schedule is not None else None
        lambdas = getattr(scheduler, "lr_lambdas", None)
        return lambdas[0] if lambdas and isinstance(lambdas[0], PlannedCosine) else None

    def _replan(self, state: FitState, plan: PlannedCosine, *, steps_this_epoch: int) -> None:
        per_step = self._train_seconds / self._timed_steps  # the mean over this session: noise averages out
        if self._val_seconds:
            validation = sum(self._val_seconds) / len(self._val_seconds)
        else:
            validation = self.val_batches * per_step * VALIDATION_COST
        left = self.seconds - self.elapsed()
        # the validations still to come: one at each epoch end, and one after the (partial) last epoch
        into_epoch = steps_this_epoch / self.steps_per_epoch
        remaining = math.floor((left - validation * (1 + into_epoch)) / (per_step + validation / self.steps_per_epoch))
        done = _phase_steps(state)
        planned = max(done, done + remaining)
        planned = min(planned, state.budget.get("cap", planned))
        planned = distributed.gather(self.group, planned)[0]  # rank 0's plan, on every process
        first = state.budget.get("first_estimate") is None
        if first:
            state.budget["first_estimate"] = planned
            plan.warmup = min(round(self.warmup_epochs * self.steps_per_epoch), planned // 5)
            log.info(
                "time budget %s: %.3f s per step, ~%.1f s per validation: %d steps planned for the last phase "
                "(%.1f epochs), warmup %d steps",
                _duration(self.seconds),
                per_step,
                validation,
                planned,
                planned / self.steps_per_epoch,
                plan.warmup,
            )
        plan.total = max(1, planned)
        if done < plan.warmup:  # a plan that shrank keeps its warmup within a fifth of it
            plan.warmup = max(done, min(plan.warmup, plan.total // 5))
        state.budget["planned"] = plan.total


def budget_epochs(seconds: float, step_seconds: float, *, steps_per_epoch: int, val_batches: int) -> float:
    """The epochs `seconds` hold at `step_seconds` per training step, each with its validation (estimated from the
    training speed, as the first plan does)."""
    epoch = steps_per_epoch * step_seconds + val_batches * step_seconds * VALIDATION_COST
    return seconds / epoch


def width_for_budget(epochs_at_default: float | None, train_images: int) -> int:
    """`model.width: auto` for a fresh small_cnn: 64 where a time budget buys at least WIDEN_FROM_EPOCHS epochs of
    the default width 32 on at least WIDEN_FROM_IMAGES training images, else 32 (`epochs_at_default` None: no
    budget). Past ~30 epochs the default stops gaining and capacity pays instead: Fashion-MNIST's 54,000 images,
    2 bf16 CPU cores, 20 minutes, one run each: width 32 trains 38 epochs to 0.9426 test accuracy, width 64 14
    epochs to 0.9464;
    at 5 minutes (9 epochs of width 32) a wider network lost (docs/benchmarks.md)."""
    default, wide = SMALL_CNN_WIDTHS
    if epochs_at_default is None or train_images < WIDEN_FROM_IMAGES:
        return default
    return wide if epochs_at_default >= WIDEN_FROM_EPOCHS else default


def budget_cap(state: FitState, steps: int) -> None:
    """Record the most steps the budgeted phase may take (its epochs x steps per epoch: `train.epochs` is an upper
    bound under a budget)."""
    state.budget = {**(state.budget or {}), "cap": steps}


def _phase_steps(state: FitState) -> int:
    """Optimizer steps the current phase's schedule has taken (LambdaLR counts them)."""
    scheduler = state.schedule.scheduler if state.schedule is not None else None
    return int(getattr(scheduler, "last_epoch", 0))


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
