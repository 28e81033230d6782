"""Classification metrics as pure functions over arrays (scikit-learn underneath)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], top_k: Sequence[int] = (3, 5)
) -> dict[str, Any]:
    """Headline and per-class metrics for integer labels `y_true` and class probabilities `probs` [n, C].

    Returns:
        accuracy, balanced_accuracy, top-k accuracies (for k < C), log_loss, macro and weighted
        precision/recall/F1, and `per_class` {name: precision, recall, f1, support}. Classes absent from
        `y_true` have support 0 and are left out of balanced accuracy.

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
        }
        for name in classes
    }
    return result


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted], including classes with no samples."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
