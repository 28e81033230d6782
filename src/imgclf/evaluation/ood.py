"""'I don't know': how unlike the training data an input is, and the threshold past which a prediction abstains.

The score is the energy of the logits (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020):
`-logsumexp(logits)`, higher = more unusual. It needs nothing but the logits, so every runtime (eager PyTorch, ONNX
Runtime, TorchScript, LiteRT) and the server compute the same number, and it ignores the temperature (a calibration
fitted later does not move the threshold). Measured (benchmarks/ood.py, small_cnn trained 3 minutes on Fashion-MNIST,
test accuracy 0.925): AUROC 0.990 against scikit-learn's digits, but only 0.779 against 28 px tiles of scikit-image's
photos (textures the model is confident about). The distance to the nearest training image in the penultimate
features (kNN, Sun et al. 2022) measured 0.995 and 0.998 there; it needs a second output from every exported runtime
and a feature bank in the bundle, which imgclf does not ship yet, so the benchmark computes it on the eager model
only.

The threshold is chosen on the validation split for a coverage (`train.ood_coverage`, default 0.95: 95 % of
validation images are accepted, a 5 % false-alarm rate on data like the training data) and stored in the bundle
(`model.json` `ood`, and so in the ONNX metadata). `predict --abstain` answers `unknown` above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OodThreshold", "auroc", "choose_threshold", "energy", "selective_accuracy"]

SCORE = "energy"


def energy(logits: np.ndarray) -> np.ndarray:
    """`-logsumexp(logits)` per row [N]: low for inputs like the training data, high for unusual ones.

    Example:
        >>> energy(np.array([[10.0, 0.0], [0.1, 0.0]])).round(2).tolist()
        [-10.0, -0.74]
    """
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))


@dataclass(frozen=True)
class OodThreshold:
    """What `model.json` stores under `ood`."""

    threshold: float  # a score above it is "unknown"
    coverage: float  # the share of validation images at or below it
    images: int  # validation images it was chosen on
    score: str = SCORE

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "threshold": self.threshold, "coverage": self.coverage, "images": self.images}

    @classmethod
    def from_dict(cls, info: dict[str, Any] | None) -> OodThreshold | None:
        if not info or info.get("threshold") is None:
            return None
        return cls(
            float(info["threshold"]), float(info["coverage"]), int(info.get("images", 0)), info.get("score", SCORE)
        )


def choose_threshold(scores: np.ndarray, coverage: float) -> OodThreshold:
    """The score below which `coverage` of these (validation) scores lie.

    Example:
        >>> choose_threshold(np.arange(100.0), 0.95).threshold
        94.05
    """
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        raise ValueError("choose_threshold needs at least one finite score; received none")
    return OodThreshold(float(np.quantile(scores, coverage)), float(coverage), len(scores))


def selective_accuracy(correct: np.ndarray, scores: np.ndarray, points: int = 50) -> dict[str, np.ndarray]:
    """Accuracy on the accepted images as the share accepted grows, most ordinary first (a risk-coverage curve).

    Args:
        correct: 1 where the prediction is right [N].
        scores: the OOD score of each [N].
        points: coverages sampled.

    Returns:
        {"coverage": [...], "accuracy": [...]}: at coverage c, the accuracy of the c*N images with the lowest scores.
    """
    correct = np.asarray(correct, dtype=np.float64)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    cumulative = np.cumsum(correct[order])
    n = len(correct)
    counts = np.unique(np.clip(np.round(np.linspace(1, n, points)).astype(int), 1, n)) if n else np.array([], int)
    return {"coverage": counts / max(n, 1), "accuracy": cumulative[counts - 1] / counts if n else counts * 0.0}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """How well the score ranks out-of-distribution inputs above in-distribution ones (1 = perfectly)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(labels, np.r_[inside, outside]))
