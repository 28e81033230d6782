"""One function per figure: data in, matplotlib Figure out. Callers write the files.

Figures are `matplotlib.figure.Figure` objects, never pyplot's: no global state, safe in a server. Sizes grow with
the number of classes or images up to a cap and fonts shrink with them, so 2 and 50 classes both stay readable.
Every function accepts zero items and then returns a small figure that says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # no display needed; figures are written to files
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

MAX_WIDTH = 16.0  # inches; 1,600 px at the report's 100 dpi
MAX_HEIGHT = 30.0  # inches
CAM_COLORMAP = "turbo"  # the same map as explain.overlay
CAM_ALPHA = 0.45
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
    loss_axes, accuracy_axes, lr_axes = figure.subplots(1, 3)
    style = {"marker": "o", "markersize": 3.5 if len(rows) <= 60 else 0, "linewidth": 1.6}
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
    lrs = _column(rows, "lr")
    lr_axes.plot(epochs, lrs, color="C4", **style)
    positive = lrs[np.isfinite(lrs)]
    if positive.size and (positive > 0).all():
        lr_axes.set_yscale("log")
        lr_axes.set_title("Learning rate (log scale)")
    else:
        lr_axes.set_title("Learning rate")

    phases = [str(row.get("phase") or "") for row in rows]
    for index in range(1, len(rows)):
        if phases[index] != phases[index - 1] and phases[index]:
            boundary = (epochs[index - 1] + epochs[index]) / 2
            name = PHASE_NAMES.get(phases[index], phases[index])
            for axes in (loss_axes, accuracy_axes, lr_axes):
                axes.axvline(boundary, color="0.35", linestyle="--", linewidth=1.2, label=f"{name} starts")
    sizes = _column(rows, "img_size")
    if np.isfinite(sizes).any() and np.nanmin(sizes) < np.nanmax(sizes):
        # progressive resizing: validation runs at full size, so its curves jump when training reaches it
        small = epochs[sizes < np.nanmax(sizes)]
        low = f"{np.nanmin(sizes):g}-{np.nanmax(sizes[sizes < np.nanmax(sizes)]):g}"
        for axes in (loss_axes, accuracy_axes):
            axes.axvspan(small.min() - 0.5, small.max() + 0.5, color="0.9", zorder=0, label=f"trained at {low} px")
    best = _number(best_epoch)
    if best in epochs:
        at = int(np.flatnonzero(epochs == best)[0])
        for axes, key in ((loss_axes, "val_loss"), (accuracy_axes, "val_acc"), (lr_axes, None)):
            axes.axvline(best, color="C2", linestyle=":", linewidth=1.8, label=f"best epoch ({best:g})")
            value = _number(rows[at].get(key)) if key else math.nan
            if math.isfinite(value):
                axes.plot([best], [value], marker="*", markersize=13, color="C2", zorder=5)
    for axes in (loss_axes, accuracy_axes, lr_axes):
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


def image_grid_figure(
    images: Sequence[np.ndarray], captions: Sequence[str], *, ncols: int = 8, title: str | None = None
) -> Figure:
    """Images in a grid, each with a caption above it.

    Args:
        images: uint8 [H, W] (drawn in grey), [H, W, 3] or [H, W, 4]; floats in [0, 1] also work. Sizes may
            differ; each keeps its aspect ratio.
        captions: one per image; lines are separated by "\\n" and shortened to the tile's width.
        ncols: images per row.
        title: shown above the grid.

    Returns:
        The figure; tiles shrink so that it stays within 16 x 30 inches.
    """
    _check_lengths(images=images, captions=captions)
    if not images:
        return _empty_figure("no images", title)
    ncols = max(1, min(ncols, len(images)))
    tiles = [_Tile(image, caption) for image, caption in zip(images, captions)]
    return _grid([tiles[i : i + ncols] for i in range(0, len(tiles), ncols)], title=title)


def sample_grid_figure(
    samples: Mapping[str, Sequence[np.ndarray]], *, max_per_class: int = 8, title: str | None = None
) -> Figure:
    """A row of example images per class, the class name on the left.

    Args:
        samples: class name -> images (as for `image_grid_figure`); a class without images gets "(none)".
        max_per_class: images shown per class.
        title: shown above the grid.

    Returns:
        The figure; tiles shrink with the class count so that 50 classes fit in 30 inches.
    """
    if not any(len(images) for images in samples.values()):
        return _empty_figure("no images", title)
    rows = [[_Tile(image, "") for image in list(images)[:max_per_class]] for images in samples.values()]
    return _grid(rows, title=title, row_labels=[str(name) for name in samples])


def augmentation_preview_figure(
    originals: Sequence[np.ndarray], augmented: Sequence[Sequence[np.ndarray]], *, title: str | None = None
) -> Figure:
    """One row per image: the original, then augmented versions of it.

    Args:
        originals: the images as decoded (uint8, as for `image_grid_figure`).
        augmented: per original, its augmented versions: uint8, or floats in [0, 1] (clipped), [H, W, C] or
            [C, H, W] as torchvision returns them. Undo any mean/std normalisation first.
        title: shown above the grid.

    Returns:
        The figure.
    """
    _check_lengths(originals=originals, augmented=augmented)
    if not originals:
        return _empty_figure("no images", title)
    rows = [
        [_Tile(original, "original"), *(_Tile(image, f"augmented {j + 1}") for j, image in enumerate(versions))]
        for original, versions in zip(originals, augmented)
    ]
    return _grid(rows, title=title)


def mistakes_figure(
    images: Sequence[np.ndarray],
    true_labels: Sequence[str],
    predicted_labels: Sequence[str],
    probabilities: Sequence[float],
    paths: Sequence[str | PurePath],
    *,
    ncols: int = 6,
    title: str | None = None,
) -> Figure:
    """Gallery of misclassified images, in the order given (the caller puts the most confident first).

    Each tile is captioned with the true class, the predicted class and its probability, and the file's last two
    path parts (class folder and file name).

    Args:
        images: the images (as for `image_grid_figure`).
        true_labels: true class names.
        predicted_labels: predicted class names.
        probabilities: the probability the model gave its (wrong) prediction.
        paths: the image files.
        ncols: images per row.
        title: shown above the grid.

    Returns:
        The figure; one saying "no misclassified images" when there are none.
    """
    _check_lengths(
        images=images,
        true_labels=true_labels,
        predicted_labels=predicted_labels,
        probabilities=probabilities,
        paths=paths,
    )
    if not images:
        return _empty_figure("no misclassified images", title)
    captions = [
        f"true: {true}\npred: {predicted} ({float(probability):.2f})\n{_short_path(path)}"
        for true, predicted, probability, path in zip(true_labels, predicted_labels, probabilities, paths)
    ]
    return image_grid_figure(images, captions, ncols=ncols, title=title)


def gradcam_figure(
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    pairs_per_row: int = 4,
    title: str | None = None,
    note: str | None = None,
) -> Figure:
    """Per example, the image and its Grad-CAM heat map over it, side by side under one caption.

    Under the grid, a colour bar gives the heat maps' scale (each map is scaled to its own maximum, so colours
    compare places within an image, not across images), and `note` under it.

    Args:
        images: the images as the model saw them (as for `image_grid_figure`).
        heatmaps: floats in [0, 1], [h, w] each (any size: stretched over its image), from `explain.grad_cam`.
        captions: one per example.
        pairs_per_row: examples per row.
        title: shown above the grid.
        note: lines under the colour bar, e.g. `explain.CamLayer.caption()`: the layer and how coarse its map is.

    Returns:
        The figure: axes[0] holds the tiles, axes[1] is the colour bar.

    Example:
        >>> gradcam_figure(images, grad_cam(model, batch), captions, note=cam_layer(model, 28).caption())
    """
    _check_lengths(images=images, heatmaps=heatmaps, captions=captions)
    if not images:
        return _empty_figure("no images", title)
    tiles = []
    for image, heatmap, caption in zip(images, heatmaps, captions):
        tiles += [_Tile(image, caption, span=2), _Tile(image, "", heatmap=np.asarray(heatmap))]
    per_row = 2 * max(1, min(pairs_per_row, len(images)))
    figure = _grid([tiles[i : i + per_row] for i in range(0, len(tiles), per_row)], title=title, group=2)
    _add_cam_colour_bar(figure, note)
    return figure


CAM_BAR_STRIP, NOTE_LINE = 0.62, 0.16  # inches: the strip under a Grad-CAM grid (bar, ticks, label); one note line


def _add_cam_colour_bar(figure: Figure, note: str | None) -> None:
    """Grow a `_grid` figure at the bottom by a strip with a horizontal colour bar of the heat maps and `note`."""
    width, height = figure.get_size_inches()
    lines = note.split("\n") if note else []
    strip = CAM_BAR_STRIP + NOTE_LINE * len(lines)
    total = height + strip
    figure.set_size_inches(width, total)
    figure.axes[0].set_ylim(total, 0)  # the tiles' canvas covers the figure in inches from the top: it stays so
    for text in figure.texts:  # the title keeps its distance from the top
        text.set_y(1 - (1 - text.get_position()[1]) * height / total)
    bar_width, bar_height, top = min(3.0, width - 2 * MARGIN), 0.11, height + 0.12
    bar = figure.add_axes(
        ((width - bar_width) / 2 / width, 1 - (top + bar_height) / total, bar_width / width, bar_height / total)
    )
    colours = ScalarMappable(Normalize(0, 1), cmap=CAM_COLORMAP)
    colour_bar = figure.colorbar(colours, cax=bar, orientation="horizontal", ticks=[0, 0.5, 1])
    colour_bar.ax.tick_params(labelsize=7, length=2, pad=1)
    colour_bar.set_label("evidence for the class (each map scaled to its own maximum)", fontsize=7, labelpad=2)
    if lines:
        font = _clamp((width - 2 * MARGIN) * 72 / (0.55 * max(map(len, lines))), 6, 9)  # ~0.55 em a character
        chars = round((width - 2 * MARGIN) * 72 / (0.55 * font))  # the longest line, unless the font is at 6
        text = "\n".join(_elide(line, chars) for line in lines)
        top = height + CAM_BAR_STRIP - 0.06
        figure.text(0.5, 1 - top / total, text, ha="center", va="top", fontsize=font, linespacing=1.2)


# --- image grids -------------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
    image: np.ndarray
    caption: str
    heatmap: np.ndarray | None = None
    span: int = 1  # tiles the caption is centred over


class _Layout(NamedTuple):
    """Sizes in inches (fonts in points) of a grid of square tiles."""

    tile: float
    font: float  # captions
    caption: float  # height above each row
    label_font: float
    label: float  # width of the row labels
    width: float
    height: float


GAP, GROUP_GAP, BLOCK_GAP, MARGIN = 0.06, 0.25, 0.35, 0.1  # inches


def _layout(nrows: int, ncols: int, *, lines: int, label_chars: int, title: bool, group: int, blocks: int) -> _Layout:
    """The largest tile (1.6 inches at most) whose grid fits MAX_WIDTH x MAX_HEIGHT; 0.3 inches at least."""
    groups = (ncols - 1) // group if group else 0
    title_height = 0.45 if title else 0.0

    def fit(tile: float) -> _Layout:
        font = _clamp(tile * 4.6, 5, 8)
        caption = lines * font * 1.25 / 72 + (0.05 if lines else 0)
        label_font = _clamp(tile * 8, 6.5, 10)
        label = label_chars * label_font * 0.55 / 72 + (0.12 if label_chars else 0)
        block = label + ncols * tile + (ncols - 1) * GAP + groups * GROUP_GAP
        width = 2 * MARGIN + blocks * block + (blocks - 1) * BLOCK_GAP
        height = 2 * MARGIN + title_height + nrows * (tile + caption) + (nrows - 1) * GAP
        return _Layout(tile, font, caption, label_font, label, width, height)

    tile = 1.6
    while tile > 0.3 and (fit(tile).width > MAX_WIDTH or fit(tile).height > MAX_HEIGHT):
        tile *= 0.95
    return fit(tile)


def _grid(
    rows: list[list[_Tile]], *, title: str | None, row_labels: Sequence[str] | None = None, group: int = 0
) -> Figure:
    """Lay tiles out row by row, in inches, shrinking them until the figure fits MAX_WIDTH x MAX_HEIGHT.

    With `row_labels` (one per row), many short rows are set in up to 4 side-by-side blocks, read top to bottom
    then left to right, whichever gives the largest tiles. `group` > 0 adds a wider gap after every `group`
    columns (image + heat map pairs).
    """
    ncols = max(1, max(len(row) for row in rows))
    lines = max((tile.caption.count("\n") + 1 if tile.caption else 0 for row in rows for tile in row), default=0)
    label_chars = min(24, max(len(label) for label in row_labels)) if row_labels else 0
    options = {"lines": lines, "label_chars": label_chars, "title": bool(title), "group": group}
    choices = range(1, min(4, len(rows)) + 1) if row_labels else (1,)
    blocks, size = 1, _layout(len(rows), ncols, blocks=1, **options)
    for k in choices[1:]:  # more blocks only for clearly larger tiles
        candidate = _layout(math.ceil(len(rows) / k), ncols, blocks=k, **options)
        if candidate.tile > 1.1 * size.tile:
            blocks, size = k, candidate
    per_block = math.ceil(len(rows) / blocks)
    tile, font = size.tile, size.font
    fig_width = max(size.width, 4.5 if title else 2.0)
    figure = Figure(figsize=(fig_width, size.height))
    # One axes over the whole figure, in inches from the top left: hundreds of tiles as images on one axes draw
    # in a fraction of the time that as many axes take.
    canvas = figure.add_axes((0, 0, 1, 1))
    canvas.set_axis_off()
    block_width = (size.width - 2 * MARGIN - (blocks - 1) * BLOCK_GAP) / blocks
    chars = max(4, int(tile * 72 / (font * 0.58)))  # characters that fit over one tile
    title_height = 0.45 if title else 0.0
    for r, row in enumerate(rows):
        block, line = divmod(r, per_block)
        left0 = (fig_width - size.width) / 2 + MARGIN + block * (block_width + BLOCK_GAP) + size.label
        top = MARGIN + title_height + line * (tile + size.caption + GAP) + size.caption
        for c, item in enumerate(row):
            left = left0 + c * (tile + GAP) + (c // group if group else 0) * GROUP_GAP
            _draw_tile(canvas, item, left, top, tile, font, chars)
        if not row:  # a class without images
            canvas.text(
                left0 + tile / 2, top + tile / 2, "(none)", ha="center", va="center", fontsize=font, color="0.4"
            )
        if row_labels:
            label = _elide(row_labels[r], 24)
            canvas.text(left0 - 0.08, top + tile / 2, label, ha="right", va="center", fontsize=size.label_font)
    canvas.set_xlim(0, fig_width)
    canvas.set_ylim(size.height, 0)
    if title:
        figure.suptitle(title, y=1 - MARGIN / size.height, va="top", fontsize=12)
    return figure


def _draw_tile(canvas: Axes, item: _Tile, left: float, top: float, tile: float, font: float, chars: int) -> None:
    """The image fitted into the square at (left, top), keeping its aspect ratio; its caption above it."""
    array, options = _displayable(item.image)
    height, width = array.shape[:2]
    scale = tile / max(height, width)
    x0, y0 = left + (tile - width * scale) / 2, top + (tile - height * scale) / 2
    extent = (x0, x0 + width * scale, y0 + height * scale, y0)
    canvas.imshow(array, extent=extent, aspect="auto", **options)
    if item.heatmap is not None:  # stretched over the image, whatever its size
        canvas.imshow(item.heatmap, extent=extent, aspect="auto", cmap=CAM_COLORMAP, vmin=0, vmax=1, alpha=CAM_ALPHA)
    frame = Rectangle((x0, y0), width * scale, height * scale, fill=False, edgecolor="0.8", linewidth=0.5)
    canvas.add_patch(frame)
    if item.caption:
        caption = "\n".join(_elide(line, chars * item.span) for line in item.caption.split("\n"))
        centre = left + (item.span * tile + (item.span - 1) * GAP) / 2
        canvas.text(centre, top - 0.03, caption, ha="center", va="bottom", fontsize=font, linespacing=1.1)


def _displayable(image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """An image array and the imshow options that draw it: grey for [H, W], floats clipped to [0, 1]."""
    array = np.asarray(image)
    shape = array.shape
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # [C, H, W], as torchvision returns
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ValueError(f"image: expected [H, W], [H, W, 1|3|4] or [C, H, W]; received shape {shape}")
    if array.dtype == np.uint8:
        top = 255
    elif np.issubdtype(array.dtype, np.integer):
        array, top = np.clip(array, 0, 255).astype(np.uint8), 255
    else:
        array, top = np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0), 1
    options: dict[str, Any] = {"cmap": "gray", "vmin": 0, "vmax": top} if array.ndim == 2 else {}
    return array, options


# --- small helpers -----------------------------------------------------------------------------------------------


def _empty_figure(message: str, title: str | None = None) -> Figure:
    """A small figure that says there is nothing to draw."""
    figure = Figure(figsize=(5, 2 if title else 1.5))
    axes = figure.add_subplot()
    axes.set_axis_off()
    style = {"boxstyle": "round,pad=0.8", "facecolor": "0.93", "edgecolor": "0.6"}
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="0.25", bbox=style)
    if title:
        figure.suptitle(title)
    return figure


def _check_lengths(**sequences: Sequence[Any]) -> None:
    lengths = {name: len(values) for name, values in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"expected one value per image in each of {', '.join(lengths)}; received lengths {lengths}")


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


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _elide(text: str, chars: int) -> str:
    """`text` shortened to `chars` characters by an ellipsis in the middle (keeps a file name's end)."""
    if len(text) <= chars:
        return text
    head = (chars - 1) // 2
    return text[:head] + "…" + text[len(text) - (chars - 1 - head) :]


def _short_path(path: str | PurePath) -> str:
    """The last two parts of a path: class folder and file name."""
    return "/".join(PurePath(str(path)).parts[-2:])
