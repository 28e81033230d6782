"""What happened in a training run, decided from its history, with the numbers that show it and their noise.

`diagnose()` reads the per-epoch history (`history.csv`) and what else is known about the run (`RunFacts`: the
split sizes, training class counts, per-class recall, identical images across splits, the resolved config, the
pretrained weights found offline). It returns verdicts: first the headline (too little training to judge,
overfitting, underfitting, good fit, or no validation), then any of few steps per epoch, splits too small to
conclude, unstable, imbalance and leakage. Each verdict carries its evidence in numbers, with the number of images
behind them, and next steps that change this run: every suggested flag names its current value, and none repeats
what the run already uses.

Evidence and noise. An accuracy measured on n images is a binomial proportion: its 95 % Wilson interval (scipy)
says what else it could have been. Two accuracies differ only when their gap exceeds 1.96 standard errors of the
difference (`gap_noise`); a val loss moves only when the change exceeds 1.96 standard errors of the two means
(`history.csv` records `val_loss_se`). A difference inside the noise is "no evidence", never a finding. Hand-made
histories without these columns (tests, old runs) skip the noise checks.

The rules are rules of thumb for typical runs; `thresholds` says why each number has its value. The modules, in
the order a verdict is made: `curves` (the history as arrays) and `facts` (what else is known, leaks from
`duplicates.csv`), `noise` (intervals and standard errors), `headline` and `findings` (the rules), `advice` (their
next steps), `verdict` (what they return).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from imgclf.evaluation.diagnose.advice import Advice
from imgclf.evaluation.diagnose.curves import Curves, read_history
from imgclf.evaluation.diagnose.facts import RunFacts, count_leaks, read_leaks, read_near_leaks
from imgclf.evaluation.diagnose.findings import few_steps, imbalance, leakage, small_splits, unstable
from imgclf.evaluation.diagnose.headline import headline
from imgclf.evaluation.diagnose.noise import accuracy_interval, gap_noise, loss_noise
from imgclf.evaluation.diagnose.thresholds import HEADLINES, PRETRAINED_CANDIDATES, VERDICT_KINDS
from imgclf.evaluation.diagnose.verdict import Verdict

__all__ = [
    "HEADLINES",
    "PRETRAINED_CANDIDATES",
    "VERDICT_KINDS",
    "RunFacts",
    "Verdict",
    "accuracy_interval",
    "count_leaks",
    "diagnose",
    "gap_noise",
    "loss_noise",
    "read_history",
    "read_leaks",
    "read_near_leaks",
]


def diagnose(history: Sequence[Mapping[str, Any]], facts: RunFacts | None = None) -> list[Verdict]:
    """Say what happened in a training run, with evidence, and what to try next.

    Args:
        history: one mapping per epoch, as from `read_history` (epoch, phase, train_loss, train_acc, val_loss,
            val_acc, lr, and where known train_ce, val_loss_se, val_images, steps, train_images).
        facts: what else is known about the run.

    Returns:
        The headline first (exactly one of too_early, overfitting, underfitting, good_fit, no_validation), then
        those of few_steps, small_splits, unstable, imbalance and leakage that apply, in that order.

    Raises:
        ValueError: the history holds no epoch.

    Example:
        >>> history = [{"epoch": e, "train_loss": 1 / e, "val_loss": abs(e - 5) / 5 + 0.5} for e in range(1, 11)]
        >>> diagnose(history)[0].title
        'Overfitting from epoch 5'
    """
    if not history:
        raise ValueError("history must hold at least one epoch; received an empty history")
    facts = facts or RunFacts()
    c = Curves.of(history, facts)
    advice = Advice(facts, c)
    verdicts = [headline(c, advice)]
    for verdict in (
        few_steps(c, advice),
        small_splits(c, facts, advice),
        unstable(c, advice),
        imbalance(facts, advice),
        leakage(facts, c, advice),
    ):
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts
