"""`imgclf tune`: a hyperparameter search with Optuna over `workflow.train` (see `imgclf.tuning`, where the code
lives, one module per concept). This module re-exports its names, so `from imgclf.tune import tune` keeps working.

Example:
    >>> from imgclf.tune import tune
    >>> tune("data/", {"train": {"epochs": 5}}, trials=20).best_params
    {'train.lr': 0.0031, 'augment.preset': 'standard', ...}
"""

from __future__ import annotations

from imgclf.tuning.objective import OBJECTIVE
from imgclf.tuning.pruning import FIRST_EPOCH, PRUNERS, WARMUP_EPOCHS, TrialReporter, make_pruner
from imgclf.tuning.space import DEFAULT_SPACE, Dimension, load_space
from imgclf.tuning.storage import GRACE_SECONDS, HEARTBEAT_SECONDS
from imgclf.tuning.study import MAX_FAILURES_IN_A_ROW, TuneResult, tune

__all__ = [
    "DEFAULT_SPACE",
    "FIRST_EPOCH",
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "MAX_FAILURES_IN_A_ROW",
    "OBJECTIVE",
    "PRUNERS",
    "WARMUP_EPOCHS",
    "Dimension",
    "TrialReporter",
    "TuneResult",
    "load_space",
    "make_pruner",
    "tune",
]

_pruner = make_pruner  # the name this module gave it before imgclf.tuning
