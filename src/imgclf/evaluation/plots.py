"""One function per figure: data in, matplotlib Figure out. Callers write the files."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; figures are written to files
import numpy as np
from matplotlib.figure import Figure


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str], *, normalize: bool = False) -> Figure:
    """Heat map of a confusion matrix (rows: true class, columns: predicted), counts or row-normalised.

    Cell labels are drawn while the grid stays readable (up to 30 classes); tick labels shrink with the class count.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    values = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    n = len(classes)
    side = min(22.0, max(4.5, 0.45 * n + 2.5))
    figure = Figure(figsize=(side, side * 0.9), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of true class" if normalize else "images")
    font = max(4, min(10, int(220 / max(n, 1))))
    axes.set_xticks(
        range(n),
        labels=classes,
        rotation=90 if n > 6 else 45,
        ha="right" if n <= 6 else "center",
        fontsize=font,
    )
    axes.set_yticks(range(n), labels=classes, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    if n <= 30:
        threshold = values.max() / 2 if values.size else 0
        for i in range(n):
            for j in range(n):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}"
                axes.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if values[i, j] > threshold else "black",
                )
    return figure


def lr_finder_figure(
    lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float, method: str
) -> Figure:
    """Loss against learning rate (log scale), raw and smoothed, with the suggested LR marked."""
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
