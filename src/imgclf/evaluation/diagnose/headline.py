"""The headline verdict of a run: too little training to judge, overfitting, underfitting, good fit, or no
validation. Exactly one applies, decided in that order."""

from __future__ import annotations

import math

import numpy as np

from imgclf.config import MIN_STEPS_PER_EPOCH
from imgclf.evaluation.diagnose.advice import Advice, images_per_class, more_of, ranked, stronger_augment
from imgclf.evaluation.diagnose.curves import Curves, accuracy_gap, last_finite, rise_after_best, still_falling
from imgclf.evaluation.diagnose.noise import accuracy_interval, loss_noise
from imgclf.evaluation.diagnose.thresholds import (
    MIN_EPOCHS_TO_JUDGE,
    MIN_STEPS_TO_JUDGE,
    OVERFIT_ACC_GAP,
    OVERFIT_VAL_RISE,
    STILL_IMPROVING,
    TRAIN_FITTED,
    UNDERFIT_ACCURACY,
)
from imgclf.evaluation.diagnose.verdict import Verdict, on_images

__all__ = ["headline"]


def headline(c: Curves, advice: Advice) -> Verdict:
    """The one headline verdict: too early to judge when it is, else the fit (or no validation)."""
    return _too_early(c, advice) or _fit(c, advice)


def _too_early(c: Curves, advice: Advice) -> Verdict | None:
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
        ranked(
            (2, advice.epochs("train for more epochs")),
            (
                3 if (c.steps_per_epoch or 99) < MIN_STEPS_PER_EPOCH else 1,
                advice.change("train.batch_size", batch, "more steps per epoch") if batch is not None else None,
            ),
        ),
    )


def _fit(c: Curves, advice: Advice) -> Verdict:
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


def _overfitting(c: Curves, advice: Advice) -> Verdict | None:
    rise = rise_after_best(c)
    if rise is None:
        return None
    best, relative, rise_beyond, rise_noise = rise
    best_loss, best_epoch = float(c.val_loss[best]), c.epochs[best]
    train_then, train_now = float(c.train_ce[best]), last_finite(c.train_ce)
    gap, gap_beyond, gap_noise_phrase = accuracy_gap(c)
    train_falling = train_now < train_then
    rising = relative >= OVERFIT_VAL_RISE and rise_beyond
    memorising = gap >= OVERFIT_ACC_GAP and gap_beyond
    if not (train_falling and (rising or memorising)):
        return None
    final_loss = last_finite(c.val_loss)
    what = "train cross-entropy" if c.comparable else "train loss"
    evidence = [
        f"val loss was lowest at epoch {best_epoch} ({best_loss:.4g}) and ended at {final_loss:.4g} "
        f"({final_loss / max(best_loss, 1e-12) - 1:+.0%}) at epoch {c.epochs[-1]}" + (rise_noise if rising else ""),
        f"{what} kept falling since epoch {best_epoch}: {train_then:.4g} -> {train_now:.4g} "
        f"({train_now / max(train_then, 1e-12) - 1:+.0%})",
    ]
    if math.isfinite(gap):
        evidence.append(
            f"final train accuracy {last_finite(c.train_acc):.1%} vs val accuracy {last_finite(c.val_acc):.1%}: "
            f"a gap of {gap * 100:.1f} points" + gap_noise_phrase
        )
    per_class = images_per_class(advice)
    few_images = per_class is not None and per_class < 200
    patience = advice.current("train.early_stopping.patience")
    return Verdict(
        "overfitting",
        f"Overfitting from epoch {best_epoch}",
        tuple(evidence),
        ranked(
            (4 if few_images else 2, advice.pretrained()),
            (
                3 if few_images else 1,
                f"more training images per class (now {per_class:.0f} on average)"
                if per_class is not None
                else "more training images per class",
            ),
            (3, stronger_augment(advice)),
            (
                2,
                advice.change(
                    "train.weight_decay",
                    more_of(advice, "train.weight_decay", 0.05),
                    "more weight decay",
                ),
            ),
            (1, advice.setting("model.dropout", 0.3, "dropout before the head")),
            (
                1 if patience is None or patience > 3 else 0,
                advice.change(
                    "train.early_stopping.patience",
                    3,
                    f"stop a few epochs after the best one (epoch {best_epoch} here; its weights are kept either way)",
                ),
            ),
        ),
        epoch=best_epoch,
    )


def _underfitting(c: Curves, advice: Advice) -> Verdict | None:
    evidence = []
    final_train_acc = last_finite(c.train_acc)
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
        interval = f" (95 % interval up to {val_top:.1%}{on_images(c.val_images)})" if val_top is not None else ""
        evidence.append(
            " and ".join(f"{name} {value:.1%}" for name, value in known.items())
            + interval
            + f" {'are both' if len(known) > 1 else 'is'} below {UNDERFIT_ACCURACY:.0%}: the model does not fit "
            "even the images it trains on"
        )
    window = c.late_window
    gap = final_train_acc - last_finite(c.val_acc)
    if len(c.epochs) > window and not (gap >= OVERFIT_ACC_GAP or final_train_acc >= TRAIN_FITTED):
        start = len(c.epochs) - 1 - window
        train_a, train_b = float(c.train_ce[start]), float(c.train_ce[-1])
        val_a, val_b = float(c.val_loss[start]), float(c.val_loss[-1])
        train_drop, val_drop = 1 - train_b / max(train_a, 1e-12), 1 - val_b / max(val_a, 1e-12)
        noise = loss_noise(c.se(start), c.se(len(c.epochs) - 1))
        beyond = noise is None or val_a - val_b > noise
        if train_drop >= STILL_IMPROVING and val_drop >= STILL_IMPROVING and beyond and still_falling(c):
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


def _underfit_steps(c: Curves, advice: Advice, *, still: bool = False) -> tuple[str, ...]:
    lr = advice.current("train.lr")
    preset = advice.current("augment.preset")
    return ranked(
        (4 if still else 2, advice.epochs("train longer")),
        (
            2,
            advice.change("train.lr", "auto", "let the LR finder pick the learning rate") if lr != "auto" else None,
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
            advice.change("augment.preset", "light", "less augmentation") if preset in ("standard", "strong") else None,
        ),
        (1, advice.change("train.label_smoothing", 0, "no label smoothing")),
    )


def _good_fit(c: Curves, advice: Advice) -> Verdict:
    best = int(np.nanargmin(c.val_loss))
    best_epoch = c.epochs[best]
    val_acc = c.val_acc[best]
    evidence = [
        f"val loss was lowest at epoch {best_epoch} of {c.epochs[-1]} ({c.val_loss[best]:.4g}"
        + (f", val accuracy {val_acc:.1%}{on_images(c.val_images)})" if math.isfinite(val_acc) else ")")
    ]
    rise = rise_after_best(c)
    if rise is not None and rise[1] >= OVERFIT_VAL_RISE and not rise[2]:
        evidence.append(
            f"val loss rose {rise[1]:.0%} after epoch {best_epoch}, within its noise{rise[3]}: no evidence of "
            "overfitting"
        )
    gap, beyond, noise_phrase = accuracy_gap(c)
    if math.isfinite(gap):
        evidence.append(
            f"final train accuracy {last_finite(c.train_acc):.1%} vs val accuracy {last_finite(c.val_acc):.1%}: "
            f"a gap of {gap * 100:.1f} points"
            + noise_phrase
            + ("" if beyond or gap < OVERFIT_ACC_GAP else ", within the noise")
        )
    still = False
    window = c.late_window
    if len(c.epochs) > window:
        start = len(c.epochs) - 1 - window
        change = float(c.val_loss[-1]) / max(float(c.val_loss[start]), 1e-12) - 1
        if change <= -STILL_IMPROVING and still_falling(c):
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
        ranked(
            (3 if still else 0, advice.epochs("train longer")),
            (2, "more training images per class"),
            (1, advice.pretrained()),
            (1, stronger_augment(advice)),
        ),
        best_epoch,
    )


def _no_validation(c: Curves, advice: Advice) -> Verdict:
    evidence = [
        f"the history has no val loss: {len(c.epochs)} epochs trained without a validation split, so over- and "
        "underfitting cannot be told apart"
    ]
    if math.isfinite(last_finite(c.train_loss)):
        evidence.append(
            f"final train loss {last_finite(c.train_loss):.4g}, train accuracy {last_finite(c.train_acc):.1%}"
        )
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
