"""Temperature scaling (Guo et al. 2017): one scalar T that makes a classifier's confidences honest.

Dividing the logits z by T > 1 softens over-confident probabilities (T < 1 sharpens them) without changing
which class wins, so accuracy stays and only calibration changes. T is fitted on held-out data (the val split)
by minimising the negative log-likelihood, and then applied to new predictions.

It works from probabilities alone: log p = z - logsumexp(z) differs from the logits by one constant per row,
and softmax ignores such constants, so softmax(log p / T) == softmax(z / T). No logits need to be stored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar  # scipy is a dependency of scikit-learn
from scipy.special import log_softmax
from sklearn import metrics as skm

from imgclf.evaluation.metrics import expected_calibration_error

__all__ = ["apply_temperature", "calibration_decision", "calibration_summary", "fit_temperature"]

# Search range of T. Beyond 20 every row is nearly uniform, below 0.05 nearly one-hot: neither is a calibration.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# log(0) is -inf; 1e-12 keeps zero probabilities finite (they become the least likely class, as before).
PROB_FLOOR = 1e-12


def fit_temperature(probs: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of `y_true` under softmax(log probs / T).

    Args:
        probs: class probabilities [n, C] on held-out data (the val split, never the test split).
        y_true: integer labels [n].

    Returns:
        T in [MIN_TEMPERATURE, MAX_TEMPERATURE]; above 1 means the model was over-confident. 1.0 when there
        are fewer than 2 samples to fit on.

    Example:
        >>> probs = np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.99, 0.01]])
        >>> fit_temperature(probs, np.array([0, 1, 1, 0])) > 1  # one confident mistake in four
        True
    """
    log_p, y_true = _log_probs(probs, y_true)
    if len(y_true) < 2:
        return 1.0
    rows = np.arange(len(y_true))

    def nll(log_t: float) -> float:
        return float(-log_softmax(log_p / math.exp(log_t), axis=1)[rows, y_true].mean())

    # Searching log T keeps the step sizes relative; the NLL is unimodal in it (convex in 1/T), so a bounded
    # Brent search finds the minimum in a few dozen evaluations of an [n, C] array.
    found = minimize_scalar(
        nll, bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)), method="bounded", options={"xatol": 1e-4}
    )
    return float(math.exp(found.x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities rescaled by a temperature: softmax(log probs / T).

    The order of classes within a row never changes (the map is monotone), so the argmax and the accuracy stay
    the same; only rows that are exact ties after rounding to float32 could come out differently.

    Args:
        probs: class probabilities [n, C].
        temperature: T > 0, as from `fit_temperature`.

    Returns:
        float32 probabilities [n, C] whose rows sum to 1; `probs` itself, unchanged, when T == 1.

    Example:
        >>> [round(float(p), 3) for p in apply_temperature(np.array([[0.8, 0.2]]), 2.0)[0]]
        [0.667, 0.333]
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; received {temperature}")
    if temperature == 1.0:
        return probs
    log_p = np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_FLOOR, 1.0))
    return np.exp(log_softmax(log_p / temperature, axis=1)).astype(np.float32)


def calibration_summary(y_true: np.ndarray, probs: np.ndarray, temperature: float) -> dict[str, Any]:
    """Calibration of `probs` before and after applying `temperature`.

    Args:
        y_true: integer labels [n].
        probs: class probabilities [n, C] (typically the test split, with T fitted on the val split).
        temperature: the fitted T.

    Returns:
        {"temperature", "ece_before", "ece_after", "log_loss_before", "log_loss_after"}, all floats.

    Example:
        >>> summary = calibration_summary(np.array([0, 1]), np.array([[0.9, 0.1], [0.6, 0.4]]), 2.0)
        >>> sorted(summary)
        ['ece_after', 'ece_before', 'log_loss_after', 'log_loss_before', 'temperature']
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    scaled = apply_temperature(probs, temperature).astype(np.float64)
    labels = np.arange(probs.shape[1])

    def log_loss(p: np.ndarray) -> float:
        return float(skm.log_loss(y_true, np.clip(p / p.sum(axis=1, keepdims=True), PROB_FLOOR, 1.0), labels=labels))

    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(y_true, probs),
        "ece_after": expected_calibration_error(y_true, scaled),
        "log_loss_before": log_loss(probs),
        "log_loss_after": log_loss(scaled),
    }


# Fewer validation images than this, and a fitted T is mostly noise: on 30 images one fit gave T = 0.144, raising
# validation ECE from 0.079 to 0.248 and test ECE from 0.113 to 0.168. A 15-bin ECE needs ~100 images to say much.
MIN_CALIBRATION_IMAGES = 100


def calibration_decision(summary: dict[str, Any], n: int, *, force: bool = False) -> str | None:
    """Why a fitted temperature must not be kept (None: keep it).

    A temperature is refused when it was fitted on fewer than `MIN_CALIBRATION_IMAGES` validation images, or when
    it does not lower the validation ECE it was fitted to improve (it minimises log loss, which can trade ECE
    away); `force` keeps it anyway.

    Example:
        >>> calibration_decision({"ece_before": 0.08, "ece_after": 0.25}, 30)
        'fitted on 30 validation images (fewer than 100) and raises validation ECE 0.0800 -> 0.2500'
    """
    if force:
        return None
    reasons = []
    if n < MIN_CALIBRATION_IMAGES:
        reasons.append(f"fitted on {n} validation images (fewer than {MIN_CALIBRATION_IMAGES})")
    if summary["ece_after"] >= summary["ece_before"]:
        reasons.append(f"raises validation ECE {summary['ece_before']:.4f} -> {summary['ece_after']:.4f}")
    return " and ".join(reasons) or None


def _log_probs(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 log probabilities [n, C] (floored) and integer labels [n], or an error naming the argument."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must be [n, C] with one row per label (n={len(y_true)}); received shape {probs.shape}")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        raise ValueError(f"y_true must hold class indices in [0, {probs.shape[1] - 1}]; received {y_true.max()}")
    return np.log(np.clip(probs, PROB_FLOOR, 1.0)), y_true
