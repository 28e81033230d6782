"""Calibration and ranking metrics (ECE, reliability bins, ROC-AUC, most-confused pairs) and temperature scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from imgclf.evaluation.calibration import (
    apply_temperature,
    calibration_decision,
    calibration_summary,
    fit_temperature,
)
from imgclf.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    most_confused_pairs,
    reliability_bins,
    roc_auc_ovr,
)

# Two confident right answers (0.9) and two less confident wrong ones (0.6).
Y_HAND = np.array([0, 0, 1, 1])
P_HAND = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])


def calibrated_set(n: int = 4000, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, C] and labels drawn from softmax(logits): probabilities calibrated by construction (~63 % right)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(n, classes))
    probs = softmax(logits, axis=1)
    labels = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return logits, labels


def reference_ece(y_true: np.ndarray, probs: np.ndarray, n_bins: int) -> float:
    """ECE written out the slow way: a mask per bin (lower, upper]."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    total = 0.0
    for lower, upper in zip(np.linspace(0, 1, n_bins + 1)[:-1], np.linspace(0, 1, n_bins + 1)[1:]):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


# --- ECE and reliability bins ---------------------------------------------------------------------------------


def test_ece_of_hand_made_predictions():
    # Separate bins: half the samples off by 0.1 (right at 0.9), half by 0.6 (wrong at 0.6).
    assert expected_calibration_error(Y_HAND, P_HAND, n_bins=10) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    # One bin: accuracy 0.5 against mean confidence 0.75.
    assert expected_calibration_error(Y_HAND, P_HAND, n_bins=1) == pytest.approx(0.25)
    # Confidence 0.5 and half right: calibrated.
    assert expected_calibration_error(np.array([0, 1]), np.full((2, 2), 0.5)) == 0.0


def test_ece_matches_a_written_out_reference():
    logits, labels = calibrated_set(500)
    probs = softmax(3 * logits, axis=1)
    for n_bins in (1, 5, 15):
        assert expected_calibration_error(labels, probs, n_bins) == pytest.approx(
            reference_ece(labels, probs, n_bins), abs=1e-12
        )


def test_reliability_bins_describe_every_sample():
    logits, labels = calibrated_set(300)
    bins = reliability_bins(labels, softmax(logits, axis=1), n_bins=15)
    assert set(bins) == {"bin_lower", "bin_upper", "confidence", "accuracy", "count", "ece"}
    assert all(len(bins[key]) == 15 for key in ("bin_lower", "bin_upper", "confidence", "accuracy", "count"))
    assert sum(bins["count"]) == 300
    assert bins["bin_lower"][0] == 0.0 and bins["bin_upper"][-1] == 1.0
    assert bins["bin_upper"][:-1] == bins["bin_lower"][1:]
    for count, confidence, accuracy, lower, upper in zip(
        bins["count"], bins["confidence"], bins["accuracy"], bins["bin_lower"], bins["bin_upper"]
    ):
        if count == 0:
            assert confidence is None and accuracy is None
        else:
            assert lower < confidence <= upper and 0 <= accuracy <= 1
    # With 4 classes no top-1 confidence is below 0.25: the low bins are empty.
    assert bins["count"][0] == 0 and bins["confidence"][0] is None
    json.dumps(bins, allow_nan=False)  # plain types only


def test_hand_made_reliability_bins():
    bins = reliability_bins(Y_HAND, P_HAND, n_bins=5)  # (0.4, 0.6] and (0.8, 1.0]
    assert bins["count"] == [0, 0, 2, 0, 2]
    assert bins["accuracy"] == [None, None, 0.0, None, 1.0]
    assert bins["confidence"][2] == pytest.approx(0.6) and bins["confidence"][4] == pytest.approx(0.9)


# --- ROC-AUC and confusions ---------------------------------------------------------------------------------------


def test_roc_auc_leaves_out_an_absent_class():
    y_true = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2]]
    )
    auc = roc_auc_ovr(y_true, probs, 3)
    assert auc["per_class"][0] == pytest.approx(roc_auc_score(y_true == 0, probs[:, 0]))
    assert auc["per_class"][1] == pytest.approx(roc_auc_score(y_true == 1, probs[:, 1]))
    assert auc["per_class"][2] is None
    assert auc["macro"] == pytest.approx((auc["per_class"][0] + auc["per_class"][1]) / 2)
    assert auc["per_class"][0] < 1.0  # the example is not trivially separable


def test_roc_auc_is_none_when_no_class_has_both_positives_and_negatives():
    auc = roc_auc_ovr(np.array([1, 1, 1]), np.full((3, 3), 1 / 3), 3)
    assert auc == {"macro": None, "per_class": [None, None, None]}


def test_most_confused_pairs_order_by_count_then_fraction():
    matrix = np.array([[5, 2, 0], [4, 1, 0], [2, 0, 8]])
    pairs = most_confused_pairs(matrix, ["cat", "dog", "fox"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("dog", "cat", 4),
        ("cat", "dog", 2),  # 2 of 7 cats...
        ("fox", "cat", 2),  # ...before 2 of 10 foxes
    ]
    assert pairs[0]["fraction_of_true"] == pytest.approx(0.8)
    assert most_confused_pairs(matrix, ["cat", "dog", "fox"], k=1) == pairs[:1]
    assert most_confused_pairs(np.eye(3, dtype=int), ["a", "b", "c"]) == []


def test_classification_metrics_include_calibration_auc_and_confusions():
    y_true = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    probs = np.array(
        [
            [0.8, 0.1, 0.05, 0.05],
            [0.3, 0.6, 0.05, 0.05],
            [0.1, 0.7, 0.1, 0.1],
            [0.2, 0.5, 0.2, 0.1],
            [0.1, 0.2, 0.6, 0.1],
            [0.6, 0.3, 0.05, 0.05],
            [0.9, 0.05, 0.03, 0.02],
            [0.2, 0.2, 0.5, 0.1],
        ],
        dtype=np.float32,
    )
    m = classification_metrics(y_true, probs, ["a", "b", "c", "d"])
    assert m["ece"] == pytest.approx(expected_calibration_error(y_true, probs))
    assert m["per_class"]["d"]["roc_auc"] is None  # absent from y_true
    assert m["per_class"]["a"]["roc_auc"] == pytest.approx(roc_auc_score(y_true == 0, probs[:, 0]))
    present = [m["per_class"][name]["roc_auc"] for name in "abc"]
    assert m["roc_auc_ovr"] == pytest.approx(sum(present) / 3)
    # One mistake each: 1 of 2 c's first, then 1 of 3 a's and 1 of 3 b's in matrix order.
    assert [(p["true"], p["predicted"]) for p in m["most_confused"]] == [("c", "a"), ("a", "b"), ("b", "c")]
    assert m["most_confused"][0]["fraction_of_true"] == 0.5
    json.dumps(m, allow_nan=False)


# --- temperature scaling --------------------------------------------------------------------------------------


def test_temperature_scaling_repairs_an_over_confident_model():
    logits, labels = calibrated_set()
    over_confident = softmax(5 * logits, axis=1)  # the calibrated model's logits, multiplied by 5
    val, test = slice(0, 2000), slice(2000, None)

    temperature = fit_temperature(over_confident[val], labels[val])
    assert 4.0 < temperature < 6.0  # the true answer is 5

    summary = calibration_summary(labels[test], over_confident[test], temperature)
    assert summary["temperature"] == temperature
    assert summary["ece_after"] < 0.05 < 0.2 < summary["ece_before"]
    assert summary["log_loss_after"] < 0.5 * summary["log_loss_before"]
    scaled = apply_temperature(over_confident[test], temperature)
    assert (scaled.argmax(axis=1) == over_confident[test].argmax(axis=1)).all()


def test_an_under_confident_model_gets_a_temperature_below_one():
    logits, labels = calibrated_set()
    assert 0.25 < fit_temperature(softmax(logits / 3, axis=1), labels) < 0.45


@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0, 20.0])
def test_apply_temperature_keeps_the_winner_and_sums_to_one(temperature):
    probs = np.random.default_rng(1).dirichlet(np.full(6, 0.5), size=500)
    scaled = apply_temperature(probs, temperature)
    assert scaled.dtype == np.float32 and scaled.shape == probs.shape
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-5)
    assert (scaled.argmax(axis=1) == probs.argmax(axis=1)).all()
    top = probs.max(axis=1)
    scaled_top = scaled.max(axis=1)
    assert (scaled_top <= top + 1e-6).all() if temperature > 1 else (scaled_top >= top - 1e-6).all()


def test_temperature_one_and_edge_cases():
    probs = np.array([[0.7, 0.3]], dtype=np.float32)
    assert apply_temperature(probs, 1.0) is probs
    assert fit_temperature(probs, np.array([0])) == 1.0  # one sample is nothing to fit on
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(probs, 0.0)
    with pytest.raises(ValueError, match="probs"):
        fit_temperature(probs, np.array([0, 1]))


def test_a_temperature_that_raises_validation_ece_is_refused_on_enough_images():
    """200 validation images: 180 at p=0.9 (90 % right: calibrated) and 20 at p=0.999 (19 right). The log-loss
    optimum softens them all (T > 1), which un-calibrates the large bin: ECE rises, so the temperature is refused."""
    confident = [[0.9, 0.1]] * 180 + [[0.999, 0.001]] * 20
    probs = np.array(confident)
    y_true = np.array([0] * 162 + [1] * 18 + [0] * 19 + [1])
    fitted = fit_temperature(probs, y_true)
    summary = calibration_summary(y_true, probs, fitted)
    assert fitted > 1 and summary["log_loss_after"] < summary["log_loss_before"]
    assert summary["ece_after"] > summary["ece_before"]
    reason = calibration_decision(summary, len(y_true))
    assert reason == f"raises validation ECE {summary['ece_before']:.4f} -> {summary['ece_after']:.4f}"
    assert calibration_decision(summary, len(y_true), force=True) is None
    better = {**summary, "ece_after": summary["ece_before"] / 2}
    assert calibration_decision(better, len(y_true)) is None  # 100+ images, lower ECE: kept
    assert "fewer than 100" in calibration_decision(better, 99)
