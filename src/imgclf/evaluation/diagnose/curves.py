"""The learning curves of a run: `history.csv` read with typed values, as float arrays, and what is read off them.

Hand-made histories without the noise columns (`val_loss_se`, `val_images`, `train_images`; tests, old runs) skip
the noise checks: `rise_after_best` and `accuracy_gap` then count every difference as beyond the noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.errors import DataError
from imgclf.evaluation.diagnose.facts import RunFacts
from imgclf.evaluation.diagnose.noise import gap_noise, loss_noise
from imgclf.evaluation.diagnose.thresholds import LATE_FRACTION, MIN_EPOCHS_AFTER_BEST, TAIL_EPOCHS
from imgclf.files import read_csv

__all__ = ["Curves", "accuracy_gap", "last_finite", "read_history", "rise_after_best", "still_falling"]


def read_history(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a run's `history.csv` with typed values.

    The columns are epoch, phase, train_loss (the objective), train_ce (its plain cross-entropy), train_acc,
    val_loss, val_loss_se, val_acc, val_images, lr, seconds, images_per_s, steps, train_images and img_size; runs
    made by older versions lack some of them.

    Args:
        path: the history file.

    Returns:
        One dict per epoch: `epoch` an int, `phase` a string ("train", "frozen", "finetune"), the other
        columns floats; an empty cell is None.

    Raises:
        DataError: the file is missing, has no epoch column, or holds a value that is not a number.

    Example:
        >>> [(row["epoch"], row["phase"]) for row in read_history("runs/small_cnn-20261128-120000/history.csv")]
        [(1, 'train'), (2, 'train')]
    """
    path = Path(path)
    try:
        rows = read_csv(path)
    except FileNotFoundError:
        raise DataError(f"history file not found: {path}") from None
    if rows and "epoch" not in rows[0]:
        raise DataError(f"{path}: expected an 'epoch' column; received columns {', '.join(rows[0])}")
    history = []
    for line, row in enumerate(rows, start=2):
        entry: dict[str, Any] = {}
        for key, cell in row.items():
            text = (cell or "").strip()  # a short row gives None for its missing cells
            if key == "phase":
                entry[key] = text or None
            elif not text:
                entry[key] = None
            else:
                try:
                    entry[key] = int(text) if key == "epoch" else float(text)
                except ValueError:
                    raise DataError(f"{path}, line {line}: {key} must be a number; received {text!r}") from None
        history.append(entry)
    return history


@dataclass(frozen=True)
class Curves:
    """The columns of a history as float arrays (NaN where a value is missing or not finite)."""

    epochs: list[int]
    phases: list[str | None]
    train_loss: np.ndarray
    train_ce: np.ndarray  # the plain cross-entropy when recorded, else the objective
    comparable: bool  # train_ce was recorded (plain cross-entropy, like val loss)
    train_acc: np.ndarray
    val_loss: np.ndarray
    val_loss_se: np.ndarray
    val_acc: np.ndarray
    lr: np.ndarray
    steps: np.ndarray
    train_images: np.ndarray
    val_images: int | None
    has_validation: bool
    nonfinite_epochs: list[int]

    @classmethod
    def of(cls, history: Sequence[Mapping[str, Any]], facts: RunFacts) -> Curves:
        def column(key: str) -> np.ndarray:
            values = [_number(row.get(key)) for row in history]
            return np.array([v if v is not None and math.isfinite(v) else np.nan for v in values])

        def broken(row: Mapping[str, Any]) -> bool:
            values = (_number(row.get("train_loss")), _number(row.get("val_loss")))
            return any(v is not None and not math.isfinite(v) for v in values)

        epochs = [int(row.get("epoch") or index + 1) for index, row in enumerate(history)]
        train_ce = column("train_ce")
        comparable = bool(np.isfinite(train_ce).any())
        val_sizes = column("val_images")
        val_images = facts.val_images or (int(np.nanmax(val_sizes)) if np.isfinite(val_sizes).any() else None)
        return cls(
            epochs=epochs,
            phases=[row.get("phase") for row in history],
            train_loss=column("train_loss"),
            train_ce=train_ce if comparable else column("train_loss"),
            comparable=comparable,
            train_acc=column("train_acc"),
            val_loss=column("val_loss"),
            val_loss_se=column("val_loss_se"),
            val_acc=column("val_acc"),
            lr=column("lr"),
            steps=column("steps"),
            train_images=column("train_images"),
            val_images=val_images,
            has_validation=any(_number(row.get("val_loss")) is not None for row in history),
            nonfinite_epochs=[e for e, row in zip(epochs, history) if broken(row)],
        )

    @property
    def late_window(self) -> int:
        """Epochs that make up "the last epochs" of the run."""
        return max(2, math.ceil(LATE_FRACTION * len(self.epochs)))

    @property
    def total_steps(self) -> int | None:
        return int(np.nansum(self.steps)) if np.isfinite(self.steps).any() else None

    @property
    def steps_per_epoch(self) -> int | None:
        return int(np.nanmin(self.steps)) if np.isfinite(self.steps).any() else None

    def train_n(self, index: int = -1) -> int | None:
        value = self.train_images[index]
        return int(value) if math.isfinite(value) else None

    def se(self, index: int) -> float | None:
        value = self.val_loss_se[index]
        return float(value) if math.isfinite(value) else None


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return float(value)


def last_finite(values: np.ndarray) -> float:
    """The last finite value (NaN when there is none)."""
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


def rise_after_best(c: Curves) -> tuple[int, float, bool, str] | None:
    """(index of the best epoch, relative rise of the val loss in the tail, whether it exceeds its noise, the
    noise phrase) when at least `MIN_EPOCHS_AFTER_BEST` epochs follow the best one."""
    best = int(np.nanargmin(c.val_loss))
    after = np.flatnonzero(np.isfinite(c.val_loss) & (np.arange(len(c.val_loss)) > best))
    if len(after) < MIN_EPOCHS_AFTER_BEST:
        return None
    tail = after[-TAIL_EPOCHS:]
    lowest_tail = int(tail[np.argmin(c.val_loss[tail])])
    best_loss = float(c.val_loss[best])
    rise = float(c.val_loss[lowest_tail]) - best_loss
    noise = loss_noise(c.se(best), c.se(lowest_tail))
    beyond = noise is None or rise > noise
    phrase = f" (noise ±{noise:.3g} with {c.val_images or '?'} val images)" if noise is not None else ""
    return best, rise / max(best_loss, 1e-12), beyond, phrase


def accuracy_gap(c: Curves) -> tuple[float, bool, str]:
    """(final train - val accuracy, whether beyond noise, a phrase with the images behind both)."""
    train_acc, val_acc = last_finite(c.train_acc), last_finite(c.val_acc)
    gap = train_acc - val_acc
    n_train, n_val = c.train_n(), c.val_images
    if not math.isfinite(gap) or n_train is None or n_val is None:
        return gap, True, ""
    noise = gap_noise(train_acc, n_train, val_acc, n_val)
    return gap, gap > noise, f" (noise ±{noise * 100:.1f} points with {n_train} train and {n_val} val images)"


def still_falling(c: Curves) -> bool:
    """The val loss fell in the last epoch too: a run whose val loss already turned is not "still improving",
    however much it fell since the window began (on 3-epoch runs the window starts in the warmup)."""
    return len(c.val_loss) >= 2 and bool(c.val_loss[-1] < c.val_loss[-2])
