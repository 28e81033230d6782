"""A study's course: `tune` checks its arguments and the space, opens the study in its storage, runs trials until
the study has as many as it asked for (in every process together), then concludes: the study's files, and the
best trial evaluated on test, once."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.config import RunConfig, build_config, dump_config
from imgclf.errors import ConfigError, TrainingDiverged
from imgclf.files import write_text_atomic
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tuning.objective import OBJECTIVE
from imgclf.tuning.pruning import PRUNERS, make_pruner
from imgclf.tuning.space import check_dimension, load_space
from imgclf.tuning.storage import finished_count, open_storage, safe_url, sampler_seed
from imgclf.tuning.summary import draw_plots, write_summary, write_trials_csv
from imgclf.tuning.trial import Surplus, TrialRunner

__all__ = ["MAX_FAILURES_IN_A_ROW", "TuneResult", "load_optuna", "stop_at", "tune"]

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 5  # failed (diverged) trials in a row that stop the study: the space trains no model


@dataclass(frozen=True)
class TuneResult:
    """What a study found, and where its files are."""

    study_dir: Path
    study_name: str
    storage: str
    best_run: Path | None  # None: the best trial ran on another machine, or no trial finished
    best_params: dict[str, Any]
    best_value: float | None
    counts: dict[str, int]  # trials by state (COMPLETE, PRUNED, FAIL, RUNNING)
    test_metrics: dict[str, Any] | None  # of the best trial, evaluated once; None until the study is complete


def tune(
    data: Path | str,
    config: RunConfig | Mapping[str, Any] | None = None,
    *,
    space: Path | str | Mapping[str, Any] | None = None,
    trials: int = 20,
    timeout: float | None = None,
    study: str | None = None,
    storage: str | None = None,
    out: Path | str = "runs",
    pruner: str = "median",
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> TuneResult:
    """Search hyperparameters with Optuna; every trial is a `train` run selected on validation accuracy.

    Args:
        data: the dataset, as for `train`.
        config: what is not searched (a `RunConfig` or nested mapping, as for `train`).
        space: YAML file or mapping of searched keys (see `load_space`); None = `DEFAULT_SPACE`.
        trials: trials the study should have finished (completed or pruned), counted over every process that
            works on it.
        timeout: stop starting new trials after this many seconds (this process).
        study: the study's name (default: the data folder's name); its folder is `out/tune-<study>`.
        storage: an Optuna RDB URL shared by several processes or machines; None = SQLite in the study folder.
        out: the folder that receives the study folder.
        pruner: median (stop a trial below the median of earlier trials at the same epoch, from its second epoch
            on) | halving (successive halving: only the best share of trials goes on at each rung) | none.
        seed: the sampler's seed (mixed with the process on a shared storage, so processes draw different
            values).
        progress: progress reporter.

    Returns:
        The best trial's run and values; its test metrics once the study has all its trials.

    Example:
        >>> import imgclf
        >>> found = imgclf.tune("data/", {"train": {"epochs": 1}}, trials=2)
        >>> found.best_params
        {'train.lr': ..., 'train.weight_decay': ..., 'train.label_smoothing': ..., 'augment.preset': '...'}
        >>> found.counts
        {'COMPLETE': 2}
    """
    optuna = load_optuna()
    from imgclf import workflow

    if trials < 1:
        raise ConfigError(f"--trials must be at least 1; received {trials}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}; received '{pruner}'")
    base = build_config(config)
    dimensions = load_space(space)
    for dimension in dimensions:  # every value of the space must make a valid config, before any trial runs
        check_dimension(base, dimension)
    name = study or Path(data).resolve().name
    study_dir = Path(out) / f"tune-{name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    the_study = _open_study(optuna, name, url, pruner, seed, shared=storage is not None)
    done = finished_count(the_study)
    log.info(
        "study %s in %s: %d of %d trials finished; %s over %s",
        name,
        safe_url(url),
        done,
        trials,
        pruner + " pruning" if pruner != "none" else "no pruning",
        ", ".join(d.key for d in dimensions),
    )
    scanned = workflow.scan_data(data, base, progress=progress)
    objective = TrialRunner(workflow, data, base, dimensions, study_dir / "trials", scanned, trials, progress)
    if done < trials:
        the_study.optimize(
            objective,
            timeout=timeout,
            callbacks=[stop_at(trials)],
            catch=(TrainingDiverged, Surplus),
            gc_after_trial=True,
        )
    return _conclude(workflow, the_study, study_dir, name, url, base, dimensions, trials, progress)


def load_optuna() -> Any:
    """The optuna module, quiet (imgclf logs each trial itself).

    Raises:
        ConfigError: Optuna is not installed (the tune extra).
    """
    try:
        import optuna
    except ImportError:
        raise ConfigError("imgclf tune needs Optuna: pip install 'imgclf[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # imgclf logs each trial itself
    return optuna


def _open_study(optuna: Any, name: str, url: str, pruner: str, seed: int, *, shared: bool) -> Any:
    """The study `name` in the storage at `url`, made or loaded, with its pruner and a TPE sampler seeded for this
    process (`storage.sampler_seed`; constant liar on a shared storage, where trials run side by side)."""
    the_study = optuna.create_study(
        storage=open_storage(optuna, url),
        study_name=name,
        direction="maximize",
        pruner=make_pruner(optuna, pruner),
        load_if_exists=True,
    )
    the_study.sampler = optuna.samplers.TPESampler(
        seed=sampler_seed(seed, len(the_study.trials), shared), constant_liar=shared
    )
    return the_study


def stop_at(trials: int, failures: int = MAX_FAILURES_IN_A_ROW):
    """Optuna's after-trial callback: stop when the study has its trials, or when this process's last `failures`
    trials all failed (diverged): the searched values train no model, and a study would otherwise try forever."""
    from optuna.trial import TrialState

    in_a_row = 0

    def stop(study, trial) -> None:
        nonlocal in_a_row
        surplus = trial.user_attrs.get("surplus")
        in_a_row = in_a_row + 1 if trial.state == TrialState.FAIL and not surplus else 0
        if finished_count(study) >= trials:
            study.stop()
        elif in_a_row >= failures:
            log.error(
                "the last %d trials failed (%s): the study stops here. Narrow the space (a lower train.lr range, "
                "train.grad_clip) and run imgclf tune again: it continues the same study",
                in_a_row,
                trial.user_attrs.get("error", "see the log above"),
            )
            study.stop()

    return stop


def _conclude(workflow, study, study_dir, name, url, base, dimensions, trials, progress) -> TuneResult:
    """Write trials.csv, the plots, best.yaml and summary.html; evaluate the best trial on test once the study is
    complete (all its trials finished, none running)."""
    from optuna.trial import TrialState

    all_trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    counts = {state.name: sum(t.state == state for t in all_trials) for state in TrialState}
    counts = {state: count for state, count in counts.items() if count}
    write_trials_csv(study_dir / "trials.csv", all_trials, dimensions)
    figures = draw_plots(study, study_dir)
    completed = [t for t in all_trials if t.state == TrialState.COMPLETE]
    best = max(completed, key=lambda t: t.value) if completed else None
    best_run = Path(best.user_attrs["run"]) if best is not None else None
    best_params = dict(best.params) if best is not None else {}
    test_metrics = None
    if best is not None:
        header = (
            f"# imgclf tune: the best of {len(completed)} completed trials of study '{name}': trial {best.number}, "
            f"{OBJECTIVE} {best.value:.4f} ({best.user_attrs.get('run')})\n"
            f"# train with: imgclf train DATA --config {study_dir / 'best.yaml'}\n"
        )
        write_text_atomic(study_dir / "best.yaml", header + dump_config(build_config(base, best_params)))
        running = counts.get("RUNNING", 0)
        if best_run is not None and not best_run.is_dir():
            log.warning(
                "the best trial (%d) ran on %s: evaluate it on test there (imgclf evaluate %s)",
                best.number,
                best.user_attrs.get("host"),
                best_run,
            )
            best_run = None
        elif finished_count(study) < trials or running:
            log.info(
                "%d of %d trials finished, %d running elsewhere: the process that finishes the study evaluates the "
                "best trial on test",
                finished_count(study),
                trials,
                running,
            )
        else:
            test_metrics = _evaluate_once(workflow, best_run, progress)
    write_summary(study_dir, name, url, counts, trials, best, test_metrics, figures, dimensions)
    return TuneResult(
        study_dir, name, safe_url(url), best_run, best_params, best.value if best else None, counts, test_metrics
    )


def _evaluate_once(workflow, run: Path, progress: Progress) -> dict[str, Any]:
    """The test metrics of the best trial: measured on the first call, read back on later ones."""
    import json

    from filelock import FileLock

    metrics = run / "metrics.json"
    with FileLock(str(run / ".evaluate.lock")):
        if not metrics.is_file():
            log.info("evaluating the best trial on the test split, once: %s", run)
            workflow.evaluate(run, progress=progress)
            workflow.report(run, progress=progress)
    return json.loads(metrics.read_text(encoding="utf-8"))
