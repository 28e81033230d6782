"""Pruning: the pruners `imgclf tune --pruner` names, and `TrialReporter`, the callback through which a training
run reports each epoch to its Optuna trial and stops, as early stopping would, when the pruner says so."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from imgclf.training.state import Callback, FitState
from imgclf.tuning.objective import OBJECTIVE, epoch_value

if TYPE_CHECKING:
    from imgclf.training.callbacks import Monitor

__all__ = ["FIRST_EPOCH", "PRUNERS", "WARMUP_EPOCHS", "TrialReporter", "make_pruner"]

log = logging.getLogger(__name__)

PRUNERS = ("median", "halving", "none")
FIRST_EPOCH = 1  # trials report their epochs as history.csv numbers them: from 1 (Optuna's step = the epoch)
# Epochs the median pruner lets every trial train before it judges one: the first epoch's accuracy says more
# about the warmup (train.warmup_epochs, 1 by default) and the initialisation than about the values drawn.
WARMUP_EPOCHS = 1


def make_pruner(optuna: Any, name: str) -> Any:
    """The Optuna pruner for `--pruner name`.

    median: from the 3rd trial on, a trial whose best accuracy so far is below the median of the earlier trials'
    at the same epoch stops; never within its first `WARMUP_EPOCHS` epochs (Optuna's `n_warmup_steps` counts
    steps from 0, and epochs are reported from `FIRST_EPOCH`, so it is their sum). halving: successive halving,
    rungs from the first epoch on (only the best third goes on at each). none: no pruning.

    Args:
        optuna: the optuna module.
        name: one of `PRUNERS`.

    Returns:
        An `optuna.pruners.BasePruner`.

    Example:
        >>> import optuna
        >>> make_pruner(optuna, "median")._n_warmup_steps
        2
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=FIRST_EPOCH + WARMUP_EPOCHS)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


class TrialReporter(Callback):
    """Reports each epoch's validation accuracy of the weights the run would ship (`objective.epoch_value`, the
    measure trials are ranked by) to the Optuna trial; when the pruner says so, the run stops there as early
    stopping would (`state.stop_reason`), keeping its best epoch and a complete run folder.

    Args:
        trial: the Optuna trial.
        monitor: the run's early-stopping monitor (which of the model's and the EMA's weights it ships); default
            val_loss, the config's default.
    """

    def __init__(self, trial: Any, monitor: Monitor | None = None) -> None:
        if monitor is None:
            from imgclf.training.callbacks import Monitor

            monitor = Monitor.resolve("val_loss")
        self.trial = trial
        self.monitor = monitor
        self.pruned_at: int | None = None

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        value = epoch_value(row, self.monitor)
        if not math.isfinite(value):
            return
        self.trial.report(value, int(row["epoch"]))
        if not state.finished and self.trial.should_prune():
            self.pruned_at = int(row["epoch"])
            state.stop_reason = (
                f"pruned by the tuner after epoch {self.pruned_at}: {OBJECTIVE} {value:.4f} is behind the trials "
                "before it at this epoch"
            )
            log.info(state.stop_reason)
