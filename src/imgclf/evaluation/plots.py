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
