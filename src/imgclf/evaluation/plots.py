"""One function per chart: data in, matplotlib Figure out. Callers write the files.

Figures are `matplotlib.figure.Figure` objects, never pyplot's: no global state, safe in a server. Importing this
module leaves matplotlib's backend alone (a `Figure` saves to PNG without one), so a notebook's inline figures still
show. Sizes grow with the number of classes up to a cap and fonts shrink with them, so 2 and 50 classes both stay
readable. Every function accepts zero items and then returns a small figure that says so.

The figures that are grids of images (samples, augmentation, mistakes, Grad-CAM) are in `grids.py`; they are
importable from here too, as they always were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imgclf.evaluation.grids import (
    CAM_ALPHA,
    CAM_COLORMAP,
    MAX_HEIGHT,
    MAX_WIDTH,
    _clamp,
    _elide,
    _empty_figure,
    augmentation_preview_figure,
    gradcam_figure,
    image_grid_figure,
    mistakes_figure,
    sample_grid_figure,
)

__all__ = [
    "CAM_ALPHA",
    "CAM_COLORMAP",
    "MAX_HEIGHT",
    "MAX_WIDTH",
    "PHASE_NAMES",
    "augmentation_preview_figure",
    "confusion_matrix_figure",
    "gradcam_figure",
    "image_grid_figure",
    "learning_curves_figure",
    "lr_finder_figure",
    "mistakes_figure",
    "per_class_figure",
    "reliability_figure",
    "sample_grid_figure",
    "selective_figure",
]

PHASE_NAMES = {"finetune": "fine-tuning", "fine_tune": "fine-tuning", "frozen": "frozen backbone", "train": "training"}


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str], *, normalize: bool = False) -> Figure:
    """Heat map of a confusion matrix (rows: true class, columns: predicted), counts or row-normalised.

    Cell labels are drawn while the grid stays readable (up to 30 classes), in a font that fits the cell; tick
    labels shrink with the class count down to 5 pt. The figure grows with the class count up to 22 inches.

    Args:
        matrix: [classes, classes] counts.
        classes: class names, in the matrix's order.
        normalize: divide each row by its total (the diagonal becomes per-class recall).

    Returns:
        The figure.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = len(classes)
    if n == 0:
        return _empty_figure("no classes", "Confusion matrix")
    values = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    side = min(22.0, max(4.5, 0.45 * n + 2.5))
    figure = Figure(figsize=(side, side * 0.9), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of true class" if normalize else "images")
    cell = 0.7 * side * 72 / n  # points per cell, roughly: the axes take about 70 % of the width
    font = _clamp(cell * 0.45, 5, 10)
    names = [_elide(str(name), 24) for name in classes]
    axes.set_xticks(range(n), labels=names, rotation=90 if n > 6 else 45, ha="right" if n <= 6 else "center")
    axes.set_yticks(range(n), labels=names)
    axes.tick_params(labelsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    if n <= 30:
        texts = [[f"{values[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}" for j in range(n)] for i in range(n)]
        widest = max(len(text) for row in texts for text in row)
        cell_font = _clamp(min(cell * 0.4, cell * 0.8 / (0.6 * widest)), 4, 11)  # digits are ~0.6 em wide
        threshold = values.max() / 2 if values.size else 0
        for i in range(n):
            for j in range(n):
                axes.text(
                    j,
                    i,
                    texts[i][j],
                    ha="center",
                    va="center",
                    fontsize=cell_font,
                    color="white" if values[i, j] > threshold else "black",
                )
    return figure


def lr_finder_figure(
    lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float, method: str
) -> Figure:
    """Loss against learning rate (log scale), raw and smoothed, with the suggested LR marked.

    Args:
        lrs: the learning rate of each step of the range test.
        losses: the training loss of each step.
        smoothed: the smoothed loss of each step.
        suggestion: the suggested learning rate.
        method: how the suggestion was chosen, for the legend.

    Returns:
        The figure.
    """
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(lrs, losses, color="0.75", linewidth=1, label="loss per step")
    axes.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed loss")
    axes.axvline(suggestion, color="C3", linestyle="--", label=f"suggestion {suggestion:.2e} ({method})")
    low, high = min(smoothed), max(smoothed[: max(2, len(smoothed) // 3)])
    axes.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("training loss")
    axes.set_title("LR finder")
    axes.legend(loc="upper left")
    axes.grid(True, which="both", alpha=0.3)
    return figure


def learning_curves_figure(history: Sequence[Mapping[str, Any]], best_epoch: int | None = None) -> Figure:
    """Loss, accuracy (train and validation) and learning rate per epoch, side by side.

    A dashed line marks each epoch where the phase changes (e.g. "fine-tuning starts"), a dotted one the best
    epoch; a grey band the epochs trained on smaller images (progressive resizing, `img_size` column). Missing
    values (None, "" or NaN, as when there is no validation split) leave gaps. With a `train_ce` column the loss
    panel compares like with like: the training batches' plain cross-entropy against the validation
    cross-entropy, and the training objective (`train_loss`, with label smoothing or MixUp) dashed beside them.

    Args:
        history: one mapping per epoch with `epoch, phase, train_loss, train_acc, val_loss, val_acc, lr,
            seconds` (and optionally `train_ce`, `img_size`); numbers or their strings, as read from history.csv.
        best_epoch: the epoch whose weights were kept, if any.

    Returns:
        The figure; one saying "no epochs" for an empty history.
    """
    rows = list(history)
    if not rows:
        return _empty_figure("no epochs", "Learning curves")
    epochs = _column(rows, "epoch")
    figure = Figure(figsize=(15, 4.2), layout="constrained")
    loss_axes, accuracy_axes, lr_axes = panels = figure.subplots(1, 3)
    style = {"marker": "o", "markersize": 3.5 if len(rows) <= 60 else 0, "linewidth": 1.6}
    _draw_loss_and_accuracy(loss_axes, accuracy_axes, rows, epochs, style)
    lrs = _column(rows, "lr")
    lr_axes.plot(epochs, lrs, color="C4", **style)
    positive = lrs[np.isfinite(lrs)]
    if positive.size and (positive > 0).all():
        lr_axes.set_yscale("log")
        lr_axes.set_title("Learning rate (log scale)")
    else:
        lr_axes.set_title("Learning rate")
    _mark_phases_and_sizes(panels, rows, epochs)
    _mark_best_epoch(panels, rows, epochs, best_epoch)
    for axes in panels:
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if np.isfinite(epochs).any():
            axes.set_xlim(np.nanmin(epochs) - 0.5, np.nanmax(epochs) + 0.5)  # one epoch: a tick, not a fraction axis
        axes.grid(True, alpha=0.3)
    for axes in (loss_axes, accuracy_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    seconds = _column(rows, "seconds")
    total = f", {np.nansum(seconds):.0f} s" if np.isfinite(seconds).any() else ""
    figure.suptitle(f"Learning curves: {len(rows)} epoch{'s' if len(rows) != 1 else ''}{total}")
    return figure


def _draw_loss_and_accuracy(
    loss_axes: Axes, accuracy_axes: Axes, rows: Sequence[Mapping[str, Any]], epochs: np.ndarray, style: dict
) -> None:
    """Training and validation curves of the loss and accuracy panels, and their titles."""
    # Train vs val on the same measure: the plain cross-entropy of the training batches (train_ce) when recorded;
    # the objective (label smoothing, class weights, MixUp) only as a dashed line beside it, when it differs.
    plain = _column(rows, "train_ce")
    objective = _column(rows, "train_loss")
    comparable = np.isfinite(plain).any()
    for axes, key, title in ((loss_axes, "loss", "Loss (cross-entropy)"), (accuracy_axes, "acc", "Accuracy")):
        for split, color in (("train", "C0"), ("val", "C1")):
            values = plain if (key, split, comparable) == ("loss", "train", True) else _column(rows, f"{split}_{key}")
            if np.isfinite(values).any():
                axes.plot(epochs, values, color=color, label="training" if split == "train" else "validation", **style)
        axes.set_title(title if key == "acc" or comparable else "Loss")
    if comparable and np.isfinite(objective).any() and not np.allclose(objective, plain, equal_nan=True, rtol=1e-3):
        loss_axes.plot(
            epochs,
            objective,
            color="C0",
            linestyle="--",
            linewidth=1.2,
            alpha=0.6,
            label="training objective (not comparable)",
        )


def _mark_phases_and_sizes(panels: Sequence[Axes], rows: Sequence[Mapping[str, Any]], epochs: np.ndarray) -> None:
    """A dashed line on every panel where the phase changes; a grey band on the loss and accuracy panels over the
    epochs trained on smaller images."""
    phases = [str(row.get("phase") or "") for row in rows]
    for index in range(1, len(rows)):
        if phases[index] != phases[index - 1] and phases[index]:
            boundary = (epochs[index - 1] + epochs[index]) / 2
            name = PHASE_NAMES.get(phases[index], phases[index])
            for axes in panels:
                axes.axvline(boundary, color="0.35", linestyle="--", linewidth=1.2, label=f"{name} starts")
    sizes = _column(rows, "img_size")
    if np.isfinite(sizes).any() and np.nanmin(sizes) < np.nanmax(sizes):
        # progressive resizing: validation runs at full size, so its curves jump when training reaches it
        small = epochs[sizes < np.nanmax(sizes)]
        low = f"{np.nanmin(sizes):g}-{np.nanmax(sizes[sizes < np.nanmax(sizes)]):g}"
        for axes in panels[:2]:
            axes.axvspan(small.min() - 0.5, small.max() + 0.5, color="0.9", zorder=0, label=f"trained at {low} px")


def _mark_best_epoch(
    panels: Sequence[Axes], rows: Sequence[Mapping[str, Any]], epochs: np.ndarray, best_epoch: int | None
) -> None:
    """A dotted line on every panel at the best epoch, and a star on its validation loss and accuracy."""
    best = _number(best_epoch)
    if best in epochs:
        at = int(np.flatnonzero(epochs == best)[0])
        for axes, key in zip(panels, ("val_loss", "val_acc", None)):
            axes.axvline(best, color="C2", linestyle=":", linewidth=1.8, label=f"best epoch ({best:g})")
            value = _number(rows[at].get(key)) if key else math.nan
            if math.isfinite(value):
                axes.plot([best], [value], marker="*", markersize=13, color="C2", zorder=5)


def per_class_figure(per_class: Mapping[str, Mapping[str, float]]) -> Figure:
    """Grouped horizontal bars of precision, recall and F1 per class, in the given (class) order, top to bottom.

    Args:
        per_class: class name -> {"precision", "recall", "f1", "support"}, as in metrics.json.

    Returns:
        The figure; its height grows with the class count up to 30 inches. Values are written on the bars for up
        to 12 classes.
    """
    if not per_class:
        return _empty_figure("no classes", "Precision, recall and F1 per class")
    names = list(per_class)
    n = len(names)
    height = min(MAX_HEIGHT, max(3.2, 1.6 + 0.32 * n))
    figure = Figure(figsize=(8, height), layout="constrained")
    axes = figure.add_subplot()
    row_points = (height - 1.6) * 72 / n
    font = _clamp(row_points * 0.45, 6, 10)
    positions = np.arange(n)
    bar = 0.26
    for offset, (key, color) in zip((-bar, 0.0, bar), (("precision", "C0"), ("recall", "C1"), ("f1", "C2"))):
        values = np.array([_number(per_class[name].get(key)) for name in names])
        bars = axes.barh(positions + offset, np.nan_to_num(values), height=bar, color=color, label=key)
        if n <= 12:
            labels = ["" if math.isnan(v) else f"{v:.2f}" for v in values]
            axes.bar_label(bars, labels=labels, padding=2, fontsize=font - 1)
    labels = []
    for name in names:
        support = per_class[name].get("support")
        labels.append(_elide(str(name), 28) + (f"  (n={int(support)})" if support is not None else ""))
    axes.set_yticks(positions, labels=labels, fontsize=font)
    axes.invert_yaxis()
    axes.set_ylim(n - 0.5, -0.5)
    axes.set_xlim(0, 1.12 if n <= 12 else 1.0)
    axes.set_xlabel("score")
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False, fontsize=9)
    return figure


def reliability_figure(curves: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal of perfect calibration, and
    below it how many images fell in each bin.

    Args:
        curves: curve label (e.g. "before calibration") -> {"bin_lower", "bin_upper", "confidence", "accuracy",
            "count": one value per bin (None for an empty bin's confidence and accuracy), "ece": float}.

    Returns:
        The figure; one saying "no predictions" when there is no curve or no counted image.
    """
    if not curves or all(sum(_column_of(curve, "count", 0.0)) == 0 for curve in curves.values()):
        return _empty_figure("no predictions", "Reliability diagram")
    figure = Figure(figsize=(6.5, 6.8), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    k = len(curves)
    for index, (label, curve) in enumerate(curves.items()):
        lower = np.array(_column_of(curve, "bin_lower", math.nan))
        upper = np.array(_column_of(curve, "bin_upper", math.nan))
        confidence = np.array(_column_of(curve, "confidence", math.nan))
        accuracy = np.array(_column_of(curve, "accuracy", math.nan))
        count = np.array(_column_of(curve, "count", 0.0))
        color = f"C{index}"
        ece = _number(curve.get("ece"))
        name = f"{label} (ECE {ece:.3f})" if math.isfinite(ece) else str(label)
        width = (upper - lower) / k
        filled = (count > 0) & np.isfinite(confidence) & np.isfinite(accuracy)
        # Bars span each bin (side by side when there are several curves); markers sit at the bin's mean confidence.
        top.bar(
            lower[filled] + index * width[filled],
            accuracy[filled],
            width=width[filled],
            align="edge",
            color=color,
            alpha=0.25,
            edgecolor=color,
            linewidth=0.6,
        )
        top.plot(confidence[filled], accuracy[filled], marker="o", markersize=4, color=color, label=name)
        bottom.bar(lower + index * width, count, width=width, align="edge", color=color, alpha=0.7, label=label)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy in bin")
    top.set_title("Reliability diagram")
    top.legend(loc="upper left", fontsize=9)
    top.grid(True, alpha=0.3)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    bottom.grid(True, axis="y", alpha=0.3)
    return figure


def selective_figure(
    curve: Mapping[str, Sequence[float]], *, threshold_coverage: float | None = None, full_accuracy: float | None = None
) -> Figure:
    """Selective classification: accuracy on the images the model answers, against the share it answers (most
    ordinary first, by the OOD score), with the stored threshold's point marked.

    Args:
        curve: {"coverage": [...], "accuracy": [...]} (`evaluation.ood.selective_accuracy`).
        threshold_coverage: the share of these images at or below the stored threshold; None: not marked.
        full_accuracy: the accuracy when every image is answered (drawn as a line).

    Returns:
        The figure; one saying "no predictions" when the curve is empty.
    """
    coverage = np.asarray(curve.get("coverage", []), dtype=float)
    accuracy = np.asarray(curve.get("accuracy", []), dtype=float)
    if not len(coverage):
        return _empty_figure("no predictions", "Accuracy against coverage")
    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    axes = figure.subplots()
    axes.plot(coverage, accuracy, color="C0", marker=".", label="accuracy of the answered images")
    if full_accuracy is not None:
        axes.axhline(full_accuracy, color="0.5", linestyle="--", linewidth=1, label="answering every image")
    if threshold_coverage is not None:
        at = float(np.interp(threshold_coverage, coverage, accuracy))
        axes.axvline(threshold_coverage, color="C3", linewidth=1)
        axes.plot(
            [threshold_coverage],
            [at],
            marker="o",
            color="C3",
            label=f"stored threshold ({threshold_coverage:.0%} answered)",
        )
    axes.set_xlim(0, 1.02)
    axes.set_xlabel("coverage: share of images answered (lowest OOD score first)")
    axes.set_ylabel("accuracy")
    axes.set_title("Accuracy against coverage (selective classification)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left", fontsize=9)
    return figure


# --- small helpers -----------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    """A float from a number, its string (history.csv) or None/"" (missing: NaN)."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([_number(row.get(key)) for row in rows], dtype=np.float64)


def _column_of(curve: Mapping[str, Any], key: str, missing: float) -> list[float]:
    values = [_number(value) for value in curve.get(key) or []]
    return [missing if math.isnan(value) else value for value in values]
