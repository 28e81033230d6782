"""The findings beside the headline, each when it applies: few steps per epoch, splits too small to conclude from,
unstable training, class imbalance that hurts small classes, and leakage across splits."""

from __future__ import annotations

import math

from imgclf.config import MIN_STEPS_PER_EPOCH
from imgclf.evaluation.diagnose.advice import Advice, ranked
from imgclf.evaluation.diagnose.curves import Curves, last_finite
from imgclf.evaluation.diagnose.facts import RunFacts
from imgclf.evaluation.diagnose.noise import accuracy_interval, gap_noise, loss_noise
from imgclf.evaluation.diagnose.thresholds import (
    DROPPED_SHARE,
    IMBALANCE_RATIO,
    LEAK_TEST_GAP,
    LIST_LIMIT,
    RECALL_SHORTFALL,
    SMALL_SPLIT_HALF_WIDTH,
    SPIKE_MIN_RISE,
    SPIKE_RATIO,
    VAL_ACC_DROP,
    VAL_ACC_DROPS,
    Z,
)
from imgclf.evaluation.diagnose.verdict import Verdict, listed, on_images

__all__ = ["few_steps", "imbalance", "leakage", "small_splits", "unstable"]


def few_steps(c: Curves, advice: Advice) -> Verdict | None:
    """Fewer than `MIN_STEPS_PER_EPOCH` optimizer steps per epoch, or over `DROPPED_SHARE` of the images left out."""
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
        ranked(
            (
                2,
                advice.change("train.batch_size", new_batch, "a smaller batch for more steps")
                if new_batch is not None
                else None,
            ),
        ),
    )


def small_splits(c: Curves, facts: RunFacts, advice: Advice) -> Verdict | None:
    """A val or test split whose 95 % interval is wider than `SMALL_SPLIT_HALF_WIDTH` either side."""
    evidence = []
    for split, n, accuracy in (
        ("val", c.val_images, facts.val_accuracy if facts.val_accuracy is not None else last_finite(c.val_acc)),
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
        ranked((2, "more images: the interval shrinks with the square root of the images"), (1, share)),
    )


def unstable(c: Curves, advice: Advice) -> Verdict | None:
    """Loss spikes within a phase, losses that are not finite, or val accuracy dropping sharply again and again."""
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
        evidence.append(f"the loss is not a finite number at epoch {listed(c.nonfinite_epochs)}")
    for epoch, name, before, after in spikes[:LIST_LIMIT]:
        factor = f" ({after / before:.1f}x)" if before > 0 else ""  # a loss of exactly 0 has no ratio
        evidence.append(f"{name} jumped at epoch {epoch}: {before:.4g} -> {after:.4g}{factor}")
    if len(spikes) > LIST_LIMIT:
        evidence.append(f"and {len(spikes) - LIST_LIMIT} more jumps")
    if oscillating:
        evidence.append(
            f"val accuracy fell by more than {VAL_ACC_DROP * 100:.0f} points "
            f"(and its noise{on_images(c.val_images)}) in "
            f"one epoch {len(drops)} times (epoch {listed(drops)})"
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
        ranked(
            (3, advice.change("train.lr", float(f"{lower:.2g}"), "a lower learning rate") if lower else None),
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
                advice.change("train.batch_size", 2 * int(batch), "a larger batch for less noisy gradients")
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


def imbalance(facts: RunFacts, advice: Advice) -> Verdict | None:
    """Class counts `IMBALANCE_RATIO` apart, when small classes are recognised less (or recall is unknown)."""
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
        for name in hurt[:LIST_LIMIT]:
            evidence.append(
                f"{name}: {counts[name]} training images, recall {recall[name]:.1%}"
                + (f" of {support[name]} images" if support.get(name) else "")
                + f" (mean recall {mean_recall:.1%})"
            )
        title = f"Class imbalance: {listed(hurt)} recognised less"
    else:
        hurt = sorted((name for name in counts if counts[name] < mean_count), key=counts.__getitem__)
        evidence.append(f"per-class recall not known; the smallest classes: {listed(hurt)}")
        title = "Class imbalance"
    names = listed(hurt)
    return Verdict(
        "imbalance",
        title,
        tuple(evidence),
        ranked(
            (
                3,
                advice.change("train.class_weights", "auto", "weight the loss by inverse class frequency"),
            ),
            (2, f"collect more images of {names}"),
            (1, f"oversample {names}: more copies or augmented variants of their images in the training folder"),
            (1, "judge runs by balanced accuracy and per-class recall, which do not reward ignoring small classes"),
        ),
    )


def leakage(facts: RunFacts, c: Curves, advice: Advice) -> Verdict | None:
    """Identical or near-duplicate images across splits; without any, a test accuracy well above val."""
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
