"""What happened in a training run, decided from its history, with the numbers that show it.

`diagnose()` looks at the per-epoch history (`history.csv`) and, where known, the training class counts,
per-class recall, cross-split duplicates and the final val/test accuracy. It returns verdicts: first the fit
(overfitting, underfitting, good fit, or no validation to judge by), then any of unstable, imbalance and
leakage. Each verdict carries its evidence in numbers and the next steps as imgclf flags.

The rules are rules of thumb for typical runs; the thresholds below say why they have their values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.errors import DataError
from imgclf.files import read_csv

VERDICT_KINDS = ("overfitting", "underfitting", "good_fit", "no_validation", "unstable", "imbalance", "leakage")

# --- overfitting: val loss turns up after its minimum while train loss keeps falling --------------------------
# A val loss 10 % above its minimum, in every one of the last epochs, is a trend rather than epoch-to-epoch noise.
OVERFIT_VAL_RISE = 0.10
# Train accuracy 10+ points above val accuracy once val loss has stopped improving: the model memorises. Small
# CNNs with BatchNorm often stall rather than climb in val loss when they overfit, so the gap counts too.
OVERFIT_ACC_GAP = 0.10
# One worse epoch after the best is noise; two in a row make a trend.
MIN_EPOCHS_AFTER_BEST = 2
# "The end" of a run is its last 3 epochs; the rise must hold in all of them, so one bad epoch decides nothing.
TAIL_EPOCHS = 3

# --- underfitting: the model does not fit its training data, or is still learning when the run ends ----------
# Neither split reaches 80 % accuracy. Val counts as well because MixUp/CutMix lower the measured train accuracy.
UNDERFIT_ACCURACY = 0.80
# "The last epochs" are the last 20 % of the run (at least 2 epochs).
LATE_FRACTION = 0.20
# Train and val loss each still fell 5 %+ over those epochs: more epochs would still pay off. (A cosine run that
# has converged moves its val loss by a percent or two at the end.)
STILL_IMPROVING = 0.05
# ...unless train accuracy is already 98 %+: the training data is fitted, and a falling loss is polishing.
TRAIN_FITTED = 0.98

# --- unstable: the optimisation jumps around ------------------------------------------------------------------
# A loss 1.5x the previous epoch's is a jump, not noise...
SPIKE_RATIO = 1.5
# ...and it must also rise by this much, so that tiny losses doubling (0.01 -> 0.02) do not count.
SPIKE_MIN_RISE = 0.05
# Val accuracy falling 10+ points in one epoch, at least twice, is oscillation rather than a bad epoch.
VAL_ACC_DROP = 0.10
VAL_ACC_DROPS = 2

# --- imbalance ------------------------------------------------------------------------------------------------
# The largest class has 3x the training images of the smallest: losses start to favour the large classes.
IMBALANCE_RATIO = 3.0
# A small class whose recall is 10+ points below the mean recall is one that the imbalance hurts.
RECALL_SHORTFALL = 0.10

# --- leakage --------------------------------------------------------------------------------------------------
# Test accuracy 5+ points above val accuracy: the test split is easier than it should be (shared images or
# sources with train), or both splits are too small to tell; either way worth a look.
LEAK_TEST_GAP = 0.05

# How many epochs or classes one evidence line names before saying "and N more".
_LIST_LIMIT = 5


@dataclass(frozen=True)
class Verdict:
    """One finding about a run.

    Attributes:
        kind: one of VERDICT_KINDS.
        title: one line for a person, e.g. "Overfitting from epoch 12".
        evidence: the numbers behind the finding, one sentence each.
        next_steps: what to try, naming imgclf flags and config keys.
        epoch: the epoch the finding points at (overfitting: its onset; good fit: the best epoch; unstable: the
            first jump), or None.
    """

    kind: str
    title: str
    evidence: tuple[str, ...]
    next_steps: tuple[str, ...]
    epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form: {"kind", "title", "evidence": [...], "next_steps": [...], "epoch"}."""
        return {
            "kind": self.kind,
            "title": self.title,
            "evidence": list(self.evidence),
            "next_steps": list(self.next_steps),
            "epoch": self.epoch,
        }


def read_history(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a run's `history.csv` with typed values.

    The columns are epoch, phase, train_loss, train_acc, val_loss, val_acc, lr, seconds, images_per_s and
    img_size (the training image size; absent in runs from before progressive resizing).

    Args:
        path: the history file.

    Returns:
        One dict per epoch: `epoch` an int, `phase` a string ("train", "frozen", "finetune"), the other
        columns floats; an empty cell (the val columns of a run without a validation split) is None.

    Raises:
        DataError: the file is missing, has no epoch column, or holds a value that is not a number.

    Example:
        >>> read_history("runs/small_cnn-20261128-120000/history.csv")[0]["val_loss"]  # doctest: +SKIP
        0.6931
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


def count_leaks(path: Path | str) -> int:
    """Pairs of identical images in different splits, from a run's `duplicates.csv` (0 when the file is absent).

    Example:
        >>> count_leaks("runs/small_cnn-20261128-120000/duplicates.csv")  # doctest: +SKIP
        0
    """
    path = Path(path)
    if not path.is_file():
        return 0
    return sum(1 for row in read_csv(path) if row.get("kind") == "leak across splits")


def diagnose(
    history: Sequence[Mapping[str, Any]],
    *,
    train_counts: Mapping[str, int] | None = None,
    per_class_recall: Mapping[str, float] | None = None,
    leaks: int = 0,
    val_accuracy: float | None = None,
    test_accuracy: float | None = None,
) -> list[Verdict]:
    """Say what happened in a training run, with evidence, and what to try next.

    Args:
        history: one mapping per epoch, as from `read_history` (epoch, phase, train_loss, train_acc, val_loss,
            val_acc, lr; missing values None).
        train_counts: training images per class name.
        per_class_recall: test (or val) recall per class name.
        leaks: identical images across splits (see `count_leaks`).
        val_accuracy: final accuracy of the selected model on the val split.
        test_accuracy: its accuracy on the test split.

    Returns:
        The headline fit verdict first (exactly one of overfitting, underfitting, good_fit, no_validation),
        then those of unstable, imbalance and leakage that apply, in that order.

    Raises:
        ValueError: the history holds no epoch.

    Example:
        >>> history = [{"epoch": e, "train_loss": 1 / e, "val_loss": abs(e - 5) / 5 + 0.5} for e in range(1, 11)]
        >>> diagnose(history)[0].title
        'Overfitting from epoch 5'
    """
    if not history:
        raise ValueError("history must hold at least one epoch; received an empty history")
    curves = _Curves.of(history)
    verdicts = [_fit(curves)]
    for verdict in (
        _unstable(curves),
        _imbalance(train_counts, per_class_recall),
        _leakage(leaks, val_accuracy, test_accuracy),
    ):
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


# --- the history as arrays ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Curves:
    """The columns of a history as float arrays (NaN where a value is missing or not finite)."""

    epochs: list[int]
    phases: list[str | None]
    train_loss: np.ndarray
    train_acc: np.ndarray
    val_loss: np.ndarray
    val_acc: np.ndarray
    lr: np.ndarray
    has_validation: bool
    nonfinite_epochs: list[int]

    @classmethod
    def of(cls, history: Sequence[Mapping[str, Any]]) -> _Curves:
        def column(key: str) -> np.ndarray:
            values = [_number(row.get(key)) for row in history]
            return np.array([v if v is not None and math.isfinite(v) else np.nan for v in values])

        def broken(row: Mapping[str, Any]) -> bool:
            values = (_number(row.get("train_loss")), _number(row.get("val_loss")))
            return any(v is not None and not math.isfinite(v) for v in values)

        epochs = [int(row.get("epoch") or index + 1) for index, row in enumerate(history)]
        return cls(
            epochs=epochs,
            phases=[row.get("phase") for row in history],
            train_loss=column("train_loss"),
            train_acc=column("train_acc"),
            val_loss=column("val_loss"),
            val_acc=column("val_acc"),
            lr=column("lr"),
            has_validation=any(_number(row.get("val_loss")) is not None for row in history),
            nonfinite_epochs=[e for e, row in zip(epochs, history) if broken(row)],
        )

    @property
    def late_window(self) -> int:
        """Epochs that make up "the last epochs" of the run."""
        return max(2, math.ceil(LATE_FRACTION * len(self.epochs)))


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return float(value)


def _last(values: np.ndarray) -> float:
    """The last finite value (NaN when there is none)."""
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


# --- the headline: how well the model fits -------------------------------------------------------------------


def _fit(c: _Curves) -> Verdict:
    if not c.has_validation:
        return _no_validation(c)
    if not np.isfinite(c.val_loss).any():
        return Verdict(
            "underfitting",
            "Underfitting: no epoch has a finite val loss",
            ("the val loss is missing or not a finite number in every epoch: the run diverged or never learned",),
            _underfit_steps(c),
        )
    return _overfitting(c) or _underfitting(c) or _good_fit(c)


def _overfitting(c: _Curves) -> Verdict | None:
    best = int(np.nanargmin(c.val_loss))
    after = c.val_loss[best + 1 :]
    after = after[np.isfinite(after)]
    if len(after) < MIN_EPOCHS_AFTER_BEST:
        return None
    best_loss, best_epoch = float(c.val_loss[best]), c.epochs[best]
    sustained_rise = float(after[-TAIL_EPOCHS:].min()) / max(best_loss, 1e-12) - 1
    train_then, train_now = float(c.train_loss[best]), _last(c.train_loss)
    gap = _last(c.train_acc) - _last(c.val_acc)
    train_falling = train_now < train_then
    rising = sustained_rise >= OVERFIT_VAL_RISE
    memorising = gap >= OVERFIT_ACC_GAP
    if not (train_falling and (rising or memorising)):
        return None
    final_loss = float(after[-1])
    evidence = [
        f"val loss was lowest at epoch {best_epoch} ({best_loss:.4g}) and ended at {final_loss:.4g} "
        f"({final_loss / max(best_loss, 1e-12) - 1:+.0%}) at epoch {c.epochs[-1]}",
        f"train loss kept falling since epoch {best_epoch}: {train_then:.4g} -> {train_now:.4g} "
        f"({train_now / max(train_then, 1e-12) - 1:+.0%})",
    ]
    if math.isfinite(gap):
        evidence.append(
            f"final train accuracy {_last(c.train_acc):.1%} vs val accuracy {_last(c.val_acc):.1%}: "
            f"a gap of {gap * 100:.1f} points"
        )
    return Verdict(
        "overfitting",
        f"Overfitting from epoch {best_epoch}",
        tuple(evidence),
        (
            "more augmentation: `--augment strong` (TrivialAugment, random erasing, MixUp/CutMix)",
            "more regularisation: `--weight-decay 0.1`, `--label-smoothing 0.1`, `--set model.dropout=0.3`",
            f"early stopping: `--patience 3` stops a few epochs after the best one (epoch {best_epoch} here); "
            "the best epoch's weights are kept either way",
            "more training images per class",
            "start from a pretrained model and fine-tune it: `--model resnet18 --pretrained --freeze-epochs 3`",
        ),
        epoch=best_epoch,
    )


def _underfitting(c: _Curves) -> Verdict | None:
    evidence = []
    final_train_acc = _last(c.train_acc)
    best_val_acc = float(np.nanmax(c.val_acc)) if np.isfinite(c.val_acc).any() else math.nan
    known = {
        name: value
        for name, value in (("final train accuracy", final_train_acc), ("best val accuracy", best_val_acc))
        if math.isfinite(value)
    }
    if known and max(known.values()) < UNDERFIT_ACCURACY:
        evidence.append(
            " and ".join(f"{name} {value:.1%}" for name, value in known.items())
            + f" {'are both' if len(known) > 1 else 'is'} below {UNDERFIT_ACCURACY:.0%}: the model does not fit "
            "even the images it trains on"
        )
    window = c.late_window
    gap = final_train_acc - _last(c.val_acc)
    if len(c.epochs) > window and not (gap >= OVERFIT_ACC_GAP or final_train_acc >= TRAIN_FITTED):
        start = len(c.epochs) - 1 - window
        train_a, train_b = float(c.train_loss[start]), float(c.train_loss[-1])
        val_a, val_b = float(c.val_loss[start]), float(c.val_loss[-1])
        train_drop, val_drop = 1 - train_b / max(train_a, 1e-12), 1 - val_b / max(val_a, 1e-12)
        if train_drop >= STILL_IMPROVING and val_drop >= STILL_IMPROVING:
            evidence.append(
                f"over the last {window} epochs train loss fell {train_drop:.0%} ({train_a:.4g} -> {train_b:.4g}) "
                f"and val loss {val_drop:.0%} ({val_a:.4g} -> {val_b:.4g}): both were still improving"
            )
    if not evidence:
        return None
    still = len(evidence) == 1 and evidence[0].startswith("over the last")
    title = "Underfitting: still improving when the run ended" if still else "Underfitting: the model fits poorly"
    return Verdict("underfitting", title, tuple(evidence), _underfit_steps(c))


def _underfit_steps(c: _Curves) -> tuple[str, ...]:
    return (
        f"train longer: `--epochs {2 * c.epochs[-1]}`",
        "a higher learning rate (`--lr`), or `--lr auto` to use the LR finder's suggestion",
        "a larger model (`--set model.width=64 --set model.depth=4` for small_cnn) or a pretrained one "
        "(`--model resnet18 --pretrained`)",
        "less augmentation and regularisation: `--augment light`, `--weight-decay 0.01`, `--label-smoothing 0`",
    )


def _good_fit(c: _Curves) -> Verdict:
    best = int(np.nanargmin(c.val_loss))
    best_epoch = c.epochs[best]
    evidence = [
        f"val loss was lowest at epoch {best_epoch} of {c.epochs[-1]} ({c.val_loss[best]:.4g}"
        + (f", val accuracy {c.val_acc[best]:.1%})" if math.isfinite(c.val_acc[best]) else ")")
    ]
    gap = _last(c.train_acc) - _last(c.val_acc)
    if math.isfinite(gap):
        evidence.append(
            f"final train accuracy {_last(c.train_acc):.1%} vs val accuracy {_last(c.val_acc):.1%}: "
            f"a gap of {gap * 100:.1f} points"
        )
    steps = [
        "to go further: more training images, or a larger or pretrained model (`--pretrained`)",
        "`--augment strong` with more epochs often adds a little once a run fits well",
    ]
    window = c.late_window
    if len(c.epochs) > window:
        start = len(c.epochs) - 1 - window
        change = float(c.val_loss[-1]) / max(float(c.val_loss[start]), 1e-12) - 1
        if change <= -STILL_IMPROVING:
            evidence.append(f"val loss still fell {-change:.0%} over the last {window} epochs: a longer run may help")
            steps.insert(0, f"train longer: `--epochs {2 * c.epochs[-1]}`")
        elif math.isfinite(change):
            evidence.append(f"val loss changed {change:+.1%} over the last {window} epochs: it has levelled off")
    return Verdict("good_fit", f"Good fit: best at epoch {best_epoch}", tuple(evidence), tuple(steps), best_epoch)


def _no_validation(c: _Curves) -> Verdict:
    evidence = [
        f"the history has no val loss: {len(c.epochs)} epochs trained without a validation split, so over- and "
        "underfitting cannot be told apart"
    ]
    if math.isfinite(_last(c.train_loss)):
        evidence.append(f"final train loss {_last(c.train_loss):.4g}, train accuracy {_last(c.train_acc):.1%}")
    return Verdict(
        "no_validation",
        "No validation split: the fit cannot be judged",
        tuple(evidence),
        (
            "add a `val/` folder beside `train/`, or give a flat folder a val share: "
            '`--set "data.split_ratios=[0.8, 0.1, 0.1]"`',
            "`imgclf split SRC DST` writes a seeded, stratified train/val/test split",
        ),
    )


# --- further findings ----------------------------------------------------------------------------------------


def _unstable(c: _Curves) -> Verdict | None:
    spikes: list[tuple[int, str, float, float]] = []  # (epoch, what, before, after)
    drops: list[int] = []
    for i in range(1, len(c.epochs)):
        if c.phases[i] != c.phases[i - 1]:
            continue  # a new phase (unfreezing) may jump on purpose
        for name, values in (("train loss", c.train_loss), ("val loss", c.val_loss)):
            before, after = values[i - 1], values[i]
            if after > SPIKE_RATIO * before and after - before > SPIKE_MIN_RISE:  # False when either is NaN
                spikes.append((c.epochs[i], name, float(before), float(after)))
        if c.val_acc[i] < c.val_acc[i - 1] - VAL_ACC_DROP:
            drops.append(c.epochs[i])
    oscillating = len(drops) >= VAL_ACC_DROPS
    if not (spikes or c.nonfinite_epochs or oscillating):
        return None
    evidence = []
    if c.nonfinite_epochs:
        evidence.append(f"the loss is not a finite number at epoch {_listed(c.nonfinite_epochs)}")
    for epoch, name, before, after in spikes[:_LIST_LIMIT]:
        evidence.append(f"{name} jumped at epoch {epoch}: {before:.4g} -> {after:.4g} ({after / before:.1f}x)")
    if len(spikes) > _LIST_LIMIT:
        evidence.append(f"and {len(spikes) - _LIST_LIMIT} more jumps")
    if oscillating:
        evidence.append(
            f"val accuracy fell by more than {VAL_ACC_DROP * 100:.0f} points in one epoch {len(drops)} times "
            f"(epoch {_listed(drops)})"
        )
    first = min([e for e, *_ in spikes] + c.nonfinite_epochs + (drops if oscillating else []))
    lr = c.lr[c.epochs.index(first)]
    if math.isfinite(lr):
        evidence.append(f"learning rate at epoch {first}: {lr:.3g}")
    steps = [
        f"a lower learning rate: `--lr {lr / 3:.2g}`, or `--lr auto`" if math.isfinite(lr) else "a lower `--lr`",
        "a longer warmup: `--set train.warmup_epochs=3`",
        "gradient clipping: `--set train.grad_clip=1.0`",
        "a larger batch (`--batch-size`) for less noisy gradients",
    ]
    if oscillating and not spikes:
        steps.append("a larger val split, so that a few images do not swing val accuracy")
    return Verdict("unstable", "Unstable training", tuple(evidence), tuple(steps), epoch=first)


def _imbalance(counts: Mapping[str, int] | None, recall: Mapping[str, float] | None) -> Verdict | None:
    if not counts:
        return None
    smallest, largest = min(counts, key=counts.__getitem__), max(counts, key=counts.__getitem__)
    ratio = counts[largest] / max(counts[smallest], 1)
    if ratio < IMBALANCE_RATIO:
        return None
    evidence = [
        f"training images per class range from {counts[smallest]} ({smallest}) to {counts[largest]} ({largest}): "
        f"{ratio:.1f}x"
    ]
    mean_count = sum(counts.values()) / len(counts)
    if recall:
        mean_recall = sum(recall.values()) / len(recall)
        hurt = sorted(
            (name for name in counts if name in recall and counts[name] < mean_count),
            key=recall.__getitem__,
        )
        hurt = [name for name in hurt if recall[name] < mean_recall - RECALL_SHORTFALL]
        if not hurt:
            return None  # imbalanced, but the small classes are recognised as well as the others
        for name in hurt[:_LIST_LIMIT]:
            evidence.append(
                f"{name}: {counts[name]} training images, recall {recall[name]:.1%} (mean recall {mean_recall:.1%})"
            )
        title = f"Class imbalance: {_listed(hurt)} recognised less"
    else:
        hurt = sorted((name for name in counts if counts[name] < mean_count), key=counts.__getitem__)
        evidence.append(f"per-class recall not known; the smallest classes: {_listed(hurt)}")
        title = "Class imbalance"
    names = _listed(hurt)
    return Verdict(
        "imbalance",
        title,
        tuple(evidence),
        (
            "weight the loss by inverse class frequency: `--class-weights auto`",
            f"collect more images of {names}",
            f"oversample {names}: more copies or augmented variants of their images in the training folder",
            "judge runs by balanced accuracy and per-class recall, which do not reward ignoring small classes",
        ),
    )


def _leakage(leaks: int, val_accuracy: float | None, test_accuracy: float | None) -> Verdict | None:
    evidence = []
    if leaks > 0:
        evidence.append(
            f"{leaks} identical image pair{'s' if leaks != 1 else ''} sit in different splits (duplicates.csv): "
            "val and test scores partly measure memory"
        )
    if val_accuracy is not None and test_accuracy is not None and test_accuracy - val_accuracy > LEAK_TEST_GAP:
        evidence.append(
            f"test accuracy {test_accuracy:.1%} is {(test_accuracy - val_accuracy) * 100:.1f} points above val "
            f"accuracy {val_accuracy:.1%}: a test split that is easier than val often shares images or sources "
            "with train (or the splits are too small to tell)"
        )
    if not evidence:
        return None
    return Verdict(
        "leakage",
        "Leakage: identical images across splits" if leaks > 0 else "Possible leakage between splits",
        tuple(evidence),
        (
            "re-split with `imgclf split SRC DST`, which keeps identical images in one split",
            "remove the duplicates listed in duplicates.csv",
            "check how the data was collected: near-duplicates (bursts, video frames, the same object or person) "
            "in different splits inflate the scores; split by source when there is one",
        ),
    )


def _listed(items: Sequence[Any]) -> str:
    shown = ", ".join(str(item) for item in items[:_LIST_LIMIT])
    return shown + (f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")
