"""One trial of a study: draw its values, train a run folder `trials/trial-NNNN` with them (validation only, the
scan shared), report each epoch to the pruner, and return the trial's value."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

from imgclf.config import build_config
from imgclf.errors import TrainingDiverged
from imgclf.tuning.objective import OBJECTIVE, kept_value
from imgclf.tuning.pruning import TrialReporter
from imgclf.tuning.storage import counted_trials
from imgclf.tuning.summary import show

__all__ = ["Surplus", "TrialRunner"]

log = logging.getLogger(__name__)


class Surplus(Exception):
    """A trial started after the study had all the trials it asked for (another process started one at the same
    moment): it does not train and is recorded as failed with the user attribute `surplus`."""


class TrialRunner:
    """The study's objective: `runner(trial)` trains one trial's run and returns its value (`kept_value`).

    Args:
        workflow: the `imgclf.workflow` module (its `train`).
        data: the dataset, as for `train`.
        base: the configuration that is not searched.
        dimensions: the search space.
        trials_dir: the folder that receives the trials' run folders.
        scanned: the scan and split every trial reuses (`workflow.scan_data`).
        trials: the study's total of trials (a trial beyond it is `Surplus`).
        progress: progress reporter.
    """

    def __init__(self, workflow, data, base, dimensions, trials_dir, scanned, trials, progress) -> None:
        self.workflow, self.data, self.base, self.dimensions = workflow, data, base, dimensions
        self.trials_dir, self.scanned, self.trials, self.progress = Path(trials_dir), scanned, trials, progress

    def __call__(self, trial: Any) -> float:
        import optuna

        from imgclf.device import preserved_torch_state
        from imgclf.training.callbacks import Monitor

        ahead = [t for t in counted_trials(trial.study) if t.number < trial.number]
        if len(ahead) >= self.trials:
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise Surplus(f"trial {trial.number}: the study already has its {self.trials} trials")
        values = {d.key: d.suggest(trial) for d in self.dimensions}
        config = build_config(self.base, values)
        run_name = f"trial-{trial.number:04d}"
        if (self.trials_dir / run_name).exists():  # a study recreated under the same name: keep the old folder
            run_name += time.strftime("-%Y%m%d-%H%M%S")
        trial.set_user_attr("run", str((self.trials_dir / run_name).resolve()))
        trial.set_user_attr("host", socket.gethostname())
        log.info("trial %d: %s", trial.number, ", ".join(f"{k} = {show(v)}" for k, v in values.items()))
        stopping = config.train.early_stopping
        reporter = TrialReporter(trial, Monitor.resolve(stopping.monitor, stopping.mode))
        with preserved_torch_state(), _recorded_failure(trial):
            result = self.workflow.train(
                self.data,
                config,
                out=self.trials_dir,
                name=run_name,
                report=False,
                evaluate_test=False,
                scanned=self.scanned,
                callbacks=[reporter],
                progress=self.progress,
            )
        value = kept_value(result.history, result.best_epoch, result.weights)  # of the weights the trial ships
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs", len(result.history))
        if reporter.pruned_at is not None:
            trial.set_user_attr("pruned_at", reporter.pruned_at)
            log.info("trial %d pruned after epoch %d (%s %.4f)", trial.number, reporter.pruned_at, OBJECTIVE, value)
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
        log.info("trial %d: %s %.4f (epoch %s)", trial.number, OBJECTIVE, value, result.best_epoch)
        return value


@contextlib.contextmanager
def _recorded_failure(trial: Any):
    """A trial whose training diverged keeps the reason (user attribute `error`, in trials.csv)."""
    try:
        yield
    except TrainingDiverged as exc:
        trial.set_user_attr("error", str(exc))
        raise
