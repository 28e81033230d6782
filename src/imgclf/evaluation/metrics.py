"""Classification metrics as pure functions over arrays (scikit-learn underneath).

Everything returned is plain Python (float, int, None, list, dict), so it goes into `metrics.json` as is.
Calibration follows Guo et al. 2017, "On Calibration of Modern Neural Networks": top-1 confidence in equal-width
bins, and the expected calibration error (ECE) as the sample-weighted mean |accuracy - confidence| over them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "most_confused_pairs",
    "reliability_bins",
    "roc_auc_ovr",
]

# 15 bins is the count Guo et al. use; fewer hide miscalibration, more leave bins nearly empty on small test sets.
CALIBRATION_BINS = 15
# Pairs listed under `most_confused` in metrics.json: enough to see a pattern, short enough to read.
MOST_CONFUSED = 10


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], top_k: Sequence[int] = (3, 5)
) -> dict[str, Any]:
    """Headline and per-class metrics for integer labels `y_true` and class probabilities `probs` [n, C].

    Returns:
        accuracy, balanced_accuracy, top-k accuracies (for k < C), log_loss, ece, roc_auc_ovr (macro one-vs-rest,
        None when no class qualifies), macro and weighted precision/recall/F1, `per_class` {name: precision,
        recall, f1, support, roc_auc} and `most_confused` (see `most_confused_pairs`). Classes absent from
        `y_true` have support 0 and roc_auc None, and are left out of balanced accuracy and the macro ROC-AUC.

    Example:
        >>> classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])["accuracy"]
        1.0
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only within rounding
    labels = np.arange(len(classes))
    y_pred = probs.argmax(axis=1)
    report = skm.classification_report(
        y_true, y_pred, labels=labels, target_names=list(classes), output_dict=True, zero_division=0
    )
    result: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        # Averages recall over the classes present in y_true.
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
    }
    for k in top_k:
        if k < len(classes):
            result[f"top{k}_accuracy"] = float(skm.top_k_accuracy_score(y_true, probs, k=k, labels=labels))
    result["log_loss"] = float(skm.log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=labels))
    result["ece"] = expected_calibration_error(y_true, probs)
    auc = roc_auc_ovr(y_true, probs, len(classes))
    result["roc_auc_ovr"] = auc["macro"]
    for average in ("macro avg", "weighted avg"):
        key = average.split()[0]
        for metric in ("precision", "recall", "f1-score"):
            result[f"{key}_{metric.replace('-score', '')}"] = float(report[average][metric])
    result["per_class"] = {
        name: {
            "precision": float(report[name]["precision"]),
            "recall": float(report[name]["recall"]),
            "f1": float(report[name]["f1-score"]),
            "support": int(report[name]["support"]),
            "roc_auc": auc["per_class"][index],
        }
        for index, name in enumerate(classes)
    }
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    result["most_confused"] = most_confused_pairs(matrix, classes, k=MOST_CONFUSED)
    return result


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted], including classes with no samples."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Top-1 confidence against accuracy in `n_bins` equal-width bins: the data of a reliability diagram.

    A prediction with confidence c falls in the bin (lower, upper] that holds c (confidence 0 in the first bin).

    Args:
        y_true: integer labels [n].
        probs: class probabilities [n, C].
        n_bins: number of bins over [0, 1].

    Returns:
        `bin_lower`, `bin_upper` (floats), `confidence` and `accuracy` (mean top-1 confidence and accuracy of
        the bin's samples; None for an empty bin) and `count` (ints), one entry per bin; and `ece`, the
        expected calibration error sum(count / n * |accuracy - confidence|) (0.0 when n is 0).

    Example:
        >>> bins = reliability_bins(np.array([0, 1]), np.array([[0.9, 0.1], [0.7, 0.3]]), n_bins=2)
        >>> bins["count"], bins["accuracy"], round(bins["ece"], 2)
        ([0, 2], [None, 0.5], 0.3)
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; received {n_bins}")
    y_true, probs = _labels_and_probs(y_true, probs)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted over the inner edges: a confidence equal to an edge belongs to the bin below it.
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(index, minlength=n_bins)
    sum_confidence = np.bincount(index, weights=confidence, minlength=n_bins)
    sum_correct = np.bincount(index, weights=correct, minlength=n_bins)
    mean_confidence = [float(s / c) if c else None for s, c in zip(sum_confidence, count)]
    mean_accuracy = [float(s / c) if c else None for s, c in zip(sum_correct, count)]
    n = len(y_true)
    ece = float(np.abs(sum_correct - sum_confidence).sum() / n) if n else 0.0  # count * |acc - conf| = |sums|
    return {
        "bin_lower": [float(x) for x in edges[:-1]],
        "bin_upper": [float(x) for x in edges[1:]],
        "confidence": mean_confidence,
        "accuracy": mean_accuracy,
        "count": [int(c) for c in count],
        "ece": ece,
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of the top-1 prediction over `n_bins` equal-width confidence bins.

    Args:
        y_true: integer labels [n].
        probs: class probabilities [n, C].
        n_bins: number of bins over [0, 1].

    Returns:
        The sample-weighted mean |accuracy - confidence| over the bins, in [0, 1]; 0 means calibrated.

    Example:
        >>> round(expected_calibration_error(np.array([0, 1]), np.array([[0.9, 0.1], [0.7, 0.3]]), n_bins=2), 4)
        0.3
    """
    return reliability_bins(y_true, probs, n_bins)["ece"]


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, Any]:
    """One-vs-rest ROC-AUC of each class's probability column, and their macro mean.

    Args:
        y_true: integer labels [n].
        probs: class probabilities [n, num_classes].
        num_classes: number of classes.

    Returns:
        {"macro": float or None, "per_class": [float or None, one per class]}. A class absent from `y_true`
        (or the only class in it) has no negatives or no positives, so its AUC is None and it is left out of
        the macro mean; the macro is None when no class qualifies.

    Example:
        >>> roc_auc_ovr(np.array([0, 1, 1]), np.array([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.6, 0.4, 0.0]]), 3)
        {'macro': 1.0, 'per_class': [1.0, 1.0, None]}
    """
    y_true, probs = _labels_and_probs(y_true, probs)
    if probs.shape[1] != num_classes:
        raise ValueError(f"probs must have num_classes={num_classes} columns; received {probs.shape[1]}")
    per_class: list[float | None] = []
    for c in range(num_classes):
        positive = y_true == c
        if positive.all() or not positive.any():
            per_class.append(None)
        else:
            per_class.append(float(skm.roc_auc_score(positive, probs[:, c])))
    scored = [auc for auc in per_class if auc is not None]
    return {"macro": float(np.mean(scored)) if scored else None, "per_class": per_class}


def most_confused_pairs(matrix: np.ndarray, classes: Sequence[str], k: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The `k` most frequent mistakes in a confusion matrix, as (true class, predicted class) pairs.

    Args:
        matrix: counts [true, predicted], as from `confusion_matrix`.
        classes: class names, in matrix order.
        k: how many pairs at most.

    Returns:
        Dicts {"true": name, "predicted": name, "count": int, "fraction_of_true": float} for off-diagonal cells
        with count > 0, most frequent first; ties go to the larger fraction of the true class's samples, then to
        matrix order. `fraction_of_true` is count / (samples of the true class).

    Example:
        >>> most_confused_pairs(np.array([[5, 1], [3, 1]]), ["cat", "dog"], k=1)
        [{'true': 'dog', 'predicted': 'cat', 'count': 3, 'fraction_of_true': 0.75}]
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape != (len(classes), len(classes)):
        raise ValueError(
            f"matrix must be square with one row per class ({len(classes)}); received shape {matrix.shape}"
        )
    row_totals = matrix.sum(axis=1)
    pairs = [
        {
            "true": classes[t],
            "predicted": classes[p],
            "count": int(matrix[t, p]),
            "fraction_of_true": float(matrix[t, p] / row_totals[t]),
        }
        for t, p in zip(*np.nonzero(matrix))
        if t != p
    ]
    pairs.sort(key=lambda pair: (-pair["count"], -pair["fraction_of_true"]))  # stable: matrix order breaks ties
    return pairs[:k]


def _labels_and_probs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer labels [n] and float64 probabilities [n, C], or an error naming the argument."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must be [n, C] with one row per label (n={len(y_true)}); received shape {probs.shape}")
    return y_true, probs
