"""`imgclf tune`: a hyperparameter search with Optuna over `workflow.train`.

1. The folder is scanned and split once; every trial reuses the scan, and the decoded cache when its
   preprocessing is the same, instead of hashing and decoding the images again.
2. Each trial draws its values from the search space (TPE), trains a normal run folder
   (`<out>/tune-<study>/trials/trial-NNNN`) and reports, after every epoch, the validation accuracy of the weights
   it would ship (with train.ema the model's own or their average, as the run chooses); the pruner (median, after
   a warm-up epoch, or successive halving) may stop it there, as early stopping would (its run folder is
   complete).
3. The trial's value is the validation accuracy of the epoch its run kept, of the weights it kept. The test split
   is never looked at while searching: only the best trial is evaluated on test, once, at the end.
4. The study lives in an Optuna storage: SQLite in the study folder by default, so an interrupted study resumes
   where it stopped (finished trials are not run again), or any Optuna RDB URL (PostgreSQL, MySQL), so several
   processes or machines work on one study; a trial is numbered by the storage and runs once, and the trial
   count asked for is the study's total, shared by every process.
5. Each trial runs inside `preserved_torch_state`: deterministic mode, thread counts and random generators are
   put back, so no trial inherits another's settings.

Writes into the study folder: best.yaml (the configuration to train with), trials.csv, history.png (validation
accuracy per trial and the best so far), importance.png (which parameters mattered), summary.html.

Modules: `study` (`tune`, the study's course and conclusion), `space` (the search space), `trial` (one trial: a
train run), `objective` (what a trial is worth, per epoch and in the end), `pruning` (the pruners and
`TrialReporter`), `storage` (the RDB storage and the trial counts shared through it), `summary` (trials.csv, the
plots, summary.html). The public names are re-exported here; `imgclf.tune` is the `tune` function.
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
