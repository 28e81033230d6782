"""What a trial is worth: the validation accuracy of the weights its run ships, measured the same way while it
trains (each epoch, for the pruner) and when it has finished (the trial's value, by which trials are ranked).

With `train.ema` a run validates two sets of weights every epoch, the model's own (`val_acc`) and their moving
average (`val_acc_ema`), and ships the one that validates better by its early-stopping monitor (the
`Checkpointer`). Ranking trials by the shipped weights and pruning them on the raw ones would judge a trial on
weights it does not ship; both use the shipped weights here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgclf.training.callbacks import Monitor

__all__ = ["OBJECTIVE", "epoch_value", "kept_value"]

OBJECTIVE = "val_acc"  # what trials report each epoch and are ranked by (maximised), of the weights they ship


def kept_value(history: list[Mapping[str, Any]], best_epoch: int | None, weights: str) -> float:
    """The trial's value: `OBJECTIVE` at the epoch its run kept, of the weights it kept.

    Args:
        history: the run's history rows.
        best_epoch: the epoch of the weights the run kept.
        weights: which weights it kept: raw (the model's) or ema (their moving average).

    Returns:
        The value; NaN when the history has no row for `best_epoch`.

    Example:
        >>> kept_value([{"epoch": 1, "val_acc": 0.8, "val_acc_ema": 0.85}], 1, "ema")
        0.85
    """
    kept = next((row for row in history if row["epoch"] == best_epoch), None)
    column = OBJECTIVE if weights == "raw" else f"{OBJECTIVE}_ema"
    return float(kept[column]) if kept is not None else float("nan")


def epoch_value(row: Mapping[str, Any], monitor: Monitor) -> float:
    """One epoch's `OBJECTIVE`, of the weights the run would ship were this epoch its best: with EMA, the average's
    when it validates better by `monitor` (strictly: a tie keeps the model's own, as the `Checkpointer` does),
    else the model's own.

    With `monitor` val_acc this is the better of `val_acc` and `val_acc_ema`, and the best of a trial's epoch values
    is its value (`kept_value`); with val_loss, the accuracy of the weights with the lower loss.

    Args:
        row: the epoch's history row (`val_acc`, and with train.ema `val_acc_ema` and the monitor's `_ema` column).
        monitor: the run's early-stopping monitor, which picks the weights it ships.

    Returns:
        The value (NaN when the chosen weights' accuracy is not finite).

    Example:
        >>> from imgclf.training.callbacks import Monitor
        >>> row = {"val_acc": 0.7, "val_acc_ema": 0.8, "val_loss": 0.9, "val_loss_ema": 0.6}
        >>> epoch_value(row, Monitor.resolve("val_loss"))  # the average has the lower loss: it would ship
        0.8
    """
    raw = float(row[OBJECTIVE])
    averaged = row.get(f"{OBJECTIVE}_ema")
    if averaged is None:  # no train.ema
        return raw
    ema_metric, raw_metric = row.get(f"{monitor.name}_ema"), row.get(monitor.name)
    if ema_metric is None or raw_metric is None or not (math.isfinite(ema_metric) and math.isfinite(raw_metric)):
        return raw
    return float(averaged) if monitor.improved(ema_metric, raw_metric) else raw
