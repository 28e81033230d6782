"""The noise of the evidence: what else a measured accuracy or loss could have been.

An accuracy measured on n images is a binomial proportion: its 95 % Wilson interval (scipy) says what else it could
have been. Two accuracies differ only when their gap exceeds 1.96 standard errors of the difference (`gap_noise`); a
val loss moves only when the change exceeds 1.96 standard errors of the two means (`history.csv` records
`val_loss_se`, `loss_noise`). A difference inside the noise is "no evidence", never a finding.
"""

from __future__ import annotations

import math

from imgclf.evaluation.diagnose.thresholds import Z

__all__ = ["accuracy_interval", "gap_noise", "loss_noise"]


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """95 % Wilson interval of an accuracy measured on `n` images.

    Example:
        >>> [round(x, 2) for x in accuracy_interval(10 / 12, 12)]
        [0.55, 0.95]
    """
    from scipy.stats import binomtest

    if n <= 0:
        return 0.0, 1.0
    k = round(accuracy * n)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def gap_noise(p1: float, n1: int, p2: float, n2: int) -> float:
    """1.96 standard errors of the difference of two accuracies on n1 and n2 images (each proportion shrunk by
    one success and one failure, so that 0 % or 100 % on few images still has a spread)."""

    def variance(p: float, n: int) -> float:
        shrunk = (p * n + 1) / (n + 2)
        return shrunk * (1 - shrunk) / max(n, 1)

    return Z * math.sqrt(variance(p1, n1) + variance(p2, n2))


def loss_noise(se_a: float | None, se_b: float | None) -> float | None:
    """1.96 standard errors of the difference of two mean losses (treated as independent: conservative, since
    the same val images stand behind both); None when a standard error is unknown."""
    if se_a is None or se_b is None or not (math.isfinite(se_a) and math.isfinite(se_b)):
        return None
    return Z * math.sqrt(se_a * se_a + se_b * se_b)
