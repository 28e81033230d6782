"""What the model answers on data like its training data: the validation split's predicted-class fractions and
top-1 confidence distribution, stored with the model so that a server's live answers can be compared with them
(`imgclf serve`'s /metrics shows both; a shift between them is drift)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["CONFIDENCE_BUCKETS", "prediction_baseline"]

# upper bounds of the top-1 confidence histogram: the stored baseline and the server's live histogram share them
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def prediction_baseline(probs: np.ndarray, classes: Sequence[str], temperature: float) -> dict[str, Any]:
    """The baseline of probabilities [N, classes] (rows of unreadable images are NaN and left out): the fraction
    of images predicted as each class and the cumulative fraction at or below each confidence bucket, with the
    temperature the probabilities were computed at (the confidences hold for that temperature only).

    Example:
        >>> base = prediction_baseline(np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8]]), ["cat", "dog"], 1.0)
        >>> base["classes"], base["confidence"]["le"][6], base["confidence"]["fraction"][6]
        ({'cat': 0.333333, 'dog': 0.666667}, 0.8, 0.666667)
    """
    probs = probs[~np.isnan(probs).any(axis=1)]
    top = probs.max(axis=1) if len(probs) else np.zeros(0)
    counts = np.bincount(probs.argmax(axis=1), minlength=len(classes)) if len(probs) else np.zeros(len(classes))
    images = max(len(probs), 1)
    return {
        "images": len(probs),
        "temperature": float(temperature),
        "classes": {name: round(float(count) / images, 6) for name, count in zip(classes, counts)},
        "confidence": {
            "le": list(CONFIDENCE_BUCKETS),
            "fraction": [round(float((top <= bound + 1e-9).sum()) / images, 6) for bound in CONFIDENCE_BUCKETS],
        },
    }
