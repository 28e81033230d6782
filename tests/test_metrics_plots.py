"""Metrics as pure functions and the confusion-matrix figure."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.evaluation.metrics import classification_metrics, confusion_matrix
from imgclf.evaluation.plots import confusion_matrix_figure


def test_metrics_on_known_predictions():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.7, 0.2], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]],
        dtype=np.float32,
    )
    m = classification_metrics(y_true, probs, ["a", "b", "c"], top_k=(2, 3))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["top2_accuracy"] == pytest.approx(5 / 6)  # sample 5 has c third
    assert "top3_accuracy" not in m  # k must be below the class count
    assert m["per_class"]["b"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
        "roc_auc": pytest.approx(0.875),  # 7 of the 8 (b, not-b) pairs ranked correctly
    }
    expected_log_loss = -np.mean(np.log([0.8, 0.3, 0.7, 0.5, 0.7, 0.1]))
    assert m["log_loss"] == pytest.approx(expected_log_loss, rel=1e-5)


def test_confusion_matrix_keeps_absent_classes():
    matrix = confusion_matrix(np.array([0, 0, 2]), np.array([0, 2, 2]), 4)
    assert matrix.shape == (4, 4)
    assert matrix.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("n", [2, 50])
@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_figure_is_drawn_for_small_and_large_class_counts(n, normalize, tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 20, (n, n))
    figure = confusion_matrix_figure(matrix, [f"class {i}" for i in range(n)], normalize=normalize)
    figure.savefig(tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 5_000
    texts = figure.axes[0].texts
    assert len(texts) == (n * n if n <= 30 else 0)
