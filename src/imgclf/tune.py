"""`imgclf tune`: a hyperparameter search with Optuna over `workflow.train`.

1. The folder is scanned and split once; every trial reuses the scan, and the decoded cache when its
   preprocessing is the same, instead of hashing and decoding the images again.
2. Each trial draws its values from the search space (TPE), trains a normal run folder
   (`<out>/tune-<study>/trials/trial-NNNN`) and reports its validation accuracy after every epoch; the pruner
   (median or successive halving) may stop it there, as early stopping would (its run folder is complete).
3. The trial's value is the validation accuracy of the epoch its run kept. The test split is never looked at
   while searching: only the best trial is evaluated on test, once, at the end.
4. The study lives in an Optuna storage: SQLite in the study folder by default, so an interrupted study resumes
   where it stopped (finished trials are not run again), or any Optuna RDB URL (PostgreSQL, MySQL), so several
   processes or machines work on one study; a trial is numbered by the storage and runs once, and the trial
   count asked for is the study's total, shared by every process.
5. Each trial runs inside `preserved_torch_state`: deterministic mode, thread counts and random generators are
   put back, so no trial inherits another's settings.

Writes into the study folder: best.yaml (the configuration to train with), trials.csv, history.png (validation
accuracy per trial and the best so far), importance.png (which parameters mattered), summary.html.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.config import RunConfig, build_config, check_key, dump_config
from imgclf.errors import ConfigError, ImgclfError, TrainingDiverged
from imgclf.files import write_bytes_atomic, write_csv_atomic, write_text_atomic
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.training.state import Callback, FitState

log = logging.getLogger(__name__)

OBJECTIVE = "val_acc"  # what trials report each epoch and are ranked by (maximised)
PRUNERS = ("median", "halving", "none")
MAX_FAILURES_IN_A_ROW = 5  # failed (diverged) trials in a row that stop the study: the space trains no model
HEARTBEAT_SECONDS = 60  # a trial whose process stops beating for GRACE_SECONDS is marked failed by the others
GRACE_SECONDS = 180

# Searched when no --space is given: the optimisation and regularisation settings that matter for any model.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
    "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "augment.preset": {"type": "categorical", "choices": ["light", "standard", "strong"]},
}


@dataclass(frozen=True)
class Dimension:
    """One searched configuration key and the values it may take."""

    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)


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


def load_space(space: Path | str | Mapping[str, Any] | None) -> list[Dimension]:
    """The search space from a YAML file or a mapping `{dotted key: spec}`, each spec one of
    `{type: float, low, high, log: true}`, `{type: int, low, high, step}`, `{type: categorical, choices: [...]}`;
    None gives `DEFAULT_SPACE`.

    Raises:
        ConfigError: an unknown key (with the closest keys), or a spec that is not one of the three forms.

    Example:
        >>> load_space({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})[0].kind
        'float'
    """
    import yaml

    if space is None:
        tree: Any = DEFAULT_SPACE
        where = "the default search space"
    elif isinstance(space, Mapping):
        tree, where = space, "the search space"
    else:
        path = Path(space)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"search space file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"search space file {path} is not valid YAML: {exc}") from None
        where = str(path)
    if not isinstance(tree, Mapping) or not tree:
        raise ConfigError(f"{where} must map config keys to ranges, e.g. train.lr: {{type: float, low: 1e-4, ...}}")
    dimensions = []
    for key, spec in tree.items():
        check_key(str(key), where)
        dimensions.append(_dimension(str(key), spec, where))
    return dimensions


def _dimension(key: str, spec: Any, where: str) -> Dimension:
    forms = "{type: float, low, high[, log, step]}, {type: int, low, high[, step, log]} or {type: categorical, choices}"
    if not isinstance(spec, Mapping) or spec.get("type") not in ("float", "int", "categorical"):
        raise ConfigError(f"{where}: {key} must be one of {forms}; received {spec!r}")
    kind = spec["type"]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: {key} (categorical) needs a non-empty list of choices; received {choices!r}")
        return Dimension(key, kind, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise ConfigError(f"{where}: {key} ({kind}) needs numbers low < high; received low={low!r}, high={high!r}")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"{where}: {key} is log-scaled, so low must be > 0; received {low}")
    return Dimension(key, kind, float(low), float(high), bool(spec.get("log", False)), spec.get("step"))


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
        pruner: median (stop a trial below the median of earlier trials at the same epoch) | halving (successive
            halving: only the best share of trials goes on at each rung) | none.
        seed: the sampler's seed (mixed with the process on a shared storage, so processes draw different
            values).
        progress: progress reporter.

    Returns:
        The best trial's run and values; its test metrics once the study has all its trials.

    Example:
        >>> imgclf.tune("data/", {"train": {"epochs": 5}}, trials=20).best_params
        {'train.lr': 0.0031, 'augment.preset': 'standard', ...}
    """
    optuna = _optuna()
    from imgclf import workflow

    if trials < 1:
        raise ConfigError(f"--trials must be at least 1; received {trials}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}; received '{pruner}'")
    base = build_config(config)
    dimensions = load_space(space)
    for dimension in dimensions:  # every value of the space must make a valid config, before any trial runs
        _check_dimension(base, dimension)
    name = study or Path(data).resolve().name
    study_dir = Path(out) / f"tune-{name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    rdb = _open_storage(optuna, url)
    the_study = optuna.create_study(
        storage=rdb, study_name=name, direction="maximize", pruner=_pruner(optuna, pruner), load_if_exists=True
    )
    shared = storage is not None
    the_study.sampler = optuna.samplers.TPESampler(
        seed=_sampler_seed(seed, len(the_study.trials), shared), constant_liar=shared
    )
    done = _finished(the_study)
    log.info(
        "study %s in %s: %d of %d trials finished; %s over %s",
        name,
        _safe_url(url),
        done,
        trials,
        pruner + " pruning" if pruner != "none" else "no pruning",
        ", ".join(d.key for d in dimensions),
    )
    scanned = workflow.scan_data(data, base, progress=progress)
    objective = _Objective(workflow, data, base, dimensions, study_dir / "trials", scanned, trials, progress)
    if done < trials:
        the_study.optimize(
            objective,
            timeout=timeout,
            callbacks=[_stop_at(trials)],
            catch=(TrainingDiverged, _Surplus),
            gc_after_trial=True,
        )
    return _conclude(workflow, the_study, study_dir, name, url, base, dimensions, trials, progress)


class _Surplus(Exception):
    """A trial started after the study had all the trials it asked for (another process started one at the same
    moment): it does not train and is recorded as failed with the user attribute `surplus`."""


class _Objective:
    def __init__(self, workflow, data, base, dimensions, trials_dir, scanned, trials, progress) -> None:
        self.workflow, self.data, self.base, self.dimensions = workflow, data, base, dimensions
        self.trials_dir, self.scanned, self.trials, self.progress = Path(trials_dir), scanned, trials, progress

    def __call__(self, trial: Any) -> float:
        import optuna

        from imgclf.device import preserved_torch_state

        ahead = [t for t in _counted(trial.study) if t.number < trial.number]
        if len(ahead) >= self.trials:
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise _Surplus(f"trial {trial.number}: the study already has its {self.trials} trials")
        values = {d.key: d.suggest(trial) for d in self.dimensions}
        config = build_config(self.base, values)
        run_name = f"trial-{trial.number:04d}"
        if (self.trials_dir / run_name).exists():  # a study recreated under the same name: keep the old folder
            run_name += time.strftime("-%Y%m%d-%H%M%S")
        trial.set_user_attr("run", str((self.trials_dir / run_name).resolve()))
        trial.set_user_attr("host", socket.gethostname())
        log.info("trial %d: %s", trial.number, ", ".join(f"{k} = {_show(v)}" for k, v in values.items()))
        reporter = TrialReporter(trial)
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
        kept = next((row for row in result.history if row["epoch"] == result.best_epoch), None)
        column = OBJECTIVE if result.weights == "raw" else f"{OBJECTIVE}_ema"  # the weights the trial ships
        value = float(kept[column]) if kept is not None else float("nan")
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


class TrialReporter(Callback):
    """Reports each epoch's validation accuracy to the Optuna trial; when the pruner says so, the run stops there
    as early stopping would (`state.stop_reason`), keeping its best epoch and a complete run folder."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(self, state: FitState, row: dict[str, float]) -> None:
        value = row[OBJECTIVE]
        if not math.isfinite(value):
            return
        self.trial.report(value, int(row["epoch"]))
        if not state.finished and self.trial.should_prune():
            self.pruned_at = int(row["epoch"])
            state.stop_reason = (
                f"pruned by the tuner after epoch {self.pruned_at}: {OBJECTIVE} {value:.4f} is behind the trials "
                "before it at this epoch"
            )
            log.info(state.stop_reason)


def _conclude(workflow, study, study_dir, name, url, base, dimensions, trials, progress) -> TuneResult:
    """Write trials.csv, the plots, best.yaml and summary.html; evaluate the best trial on test once the study is
    complete (all its trials finished, none running)."""
    from optuna.trial import TrialState

    all_trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    counts = {state.name: sum(t.state == state for t in all_trials) for state in TrialState}
    counts = {state: count for state, count in counts.items() if count}
    _write_trials_csv(study_dir / "trials.csv", all_trials, dimensions)
    figures = _draw(study, study_dir)
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
        elif _finished(study) < trials or running:
            log.info(
                "%d of %d trials finished, %d running elsewhere: the process that finishes the study evaluates the "
                "best trial on test",
                _finished(study),
                trials,
                running,
            )
        else:
            test_metrics = _evaluate_once(workflow, best_run, progress)
    _write_summary(study_dir, name, url, counts, trials, best, test_metrics, figures, dimensions)
    return TuneResult(
        study_dir, name, _safe_url(url), best_run, best_params, best.value if best else None, counts, test_metrics
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


def _write_trials_csv(path: Path, trials: Sequence[Any], dimensions: Sequence[Dimension]) -> None:
    keys = [d.key for d in dimensions]
    header = [
        "number", "state", OBJECTIVE, "best_epoch", "epochs", "pruned_at", "seconds", "host", "run", *keys, "error"
    ]  # fmt: skip
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            [
                t.number,
                t.state.name.lower(),
                _blank(t.value),
                _blank(t.user_attrs.get("best_epoch")),
                _blank(t.user_attrs.get("epochs")),
                _blank(t.user_attrs.get("pruned_at")),
                _blank(round(seconds, 1) if seconds is not None else None),
                t.user_attrs.get("host", ""),
                t.user_attrs.get("run", ""),
                *[_blank(t.params.get(key)) for key in keys],
                t.user_attrs.get("error", ""),
            ]
        )
    write_csv_atomic(path, header, rows)


def _draw(study, study_dir: Path) -> dict[str, bytes]:
    """history.png and importance.png with Optuna's matplotlib plots; a plot Optuna cannot draw yet (importance
    needs two completed trials) is left out with a log line."""
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    drawn = {}
    for name, draw in (("history", plots.plot_optimization_history), ("importance", plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("tune: no %s plot yet (%s)", name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.set_size_inches(8, 4.5)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        write_bytes_atomic(study_dir / f"{name}.png", buffer.getvalue())
        drawn[name] = buffer.getvalue()
    return drawn


def _write_summary(study_dir, name, url, counts, trials, best, test_metrics, figures, dimensions) -> None:
    import html

    def table(rows: Sequence[tuple[str, Any]]) -> str:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_show(v))}</td></tr>" for k, v in rows)
        return f"<table>{cells}</table>"

    parts = [
        f"<h1>imgclf tune: {html.escape(name)}</h1>",
        f"<p>Storage <code>{html.escape(_safe_url(url))}</code>; {trials} trials asked for; "
        + ", ".join(f"{count} {state.lower()}" for state, count in counts.items())
        + f". Trials are ranked by the validation accuracy of the epoch each run kept ({OBJECTIVE}); the test split "
        "is evaluated for the best trial only, once.</p>",
        "<h2>Searched</h2>",
        table([(d.key, _space_text(d)) for d in dimensions]),
    ]
    if best is not None:
        parts += [
            f"<h2>Best trial: {best.number}</h2>",
            table([(OBJECTIVE, best.value), *best.params.items(), ("run", best.user_attrs.get("run"))]),
            "<p>Train with it: <code>imgclf train DATA --config "
            + html.escape(str(study_dir / "best.yaml"))
            + "</code></p>",
        ]
        if test_metrics:
            keys = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "n")
            parts += ["<h3>Its test metrics (measured once)</h3>", table([(k, test_metrics.get(k)) for k in keys])]
    for key, title in (("history", "Validation accuracy per trial"), ("importance", "Which parameters mattered")):
        if key in figures:
            data = base64.b64encode(figures[key]).decode("ascii")
            parts += [f"<h2>{title}</h2>", f'<img alt="{key}" src="data:image/png;base64,{data}">']
    parts.append('<p>Every trial: <a href="trials.csv">trials.csv</a>; each is a run folder under trials/.</p>')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:0 auto;padding:0 1.5rem 2rem;color:#1d2330}"
        "table{border-collapse:collapse}td{border:1px solid #dde3ec;padding:.2rem .6rem}img{max-width:100%}"
        "code{background:#eef1f5;padding:0 .25rem}"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>imgclf tune: {html.escape(name)}'
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    write_text_atomic(study_dir / "summary.html", page)


# --- helpers --------------------------------------------------------------------------------------------------


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("imgclf tune needs Optuna: pip install 'imgclf[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # imgclf logs each trial itself
    return optuna


def _open_storage(optuna, url: str):
    """The study's RDB storage, with heartbeats (a trial whose process died is marked failed, and its place in the
    count freed); a missing driver or an unreachable database is said with the URL (password hidden)."""
    import random
    import warnings

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.x
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        except ImportError as exc:
            raise ConfigError(
                f"--storage {_safe_url(url)}: the database driver is not installed ({exc}); for PostgreSQL: pip "
                "install 'psycopg[binary]', for MySQL: pip install pymysql"
            ) from None
        except Exception as exc:  # SQLAlchemy's errors: wrong URL, unreachable server, no permission, and ...
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            if attempt == 2 or "IntegrityError" not in type(exc).__name__:
                raise ImgclfError(
                    f"cannot open the study storage {_safe_url(url)}: {str(exc).splitlines()[0]}"
                ) from None
            # ... two processes creating the tables of a new database at the same moment: the other one won, so
            # the tables exist when this one tries again
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def _pruner(optuna, name: str):
    if name == "median":  # from the 3rd trial on, after the first epoch
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _stop_at(trials: int, failures: int = MAX_FAILURES_IN_A_ROW):
    """Optuna's after-trial callback: stop when the study has its trials, or when this process's last `failures`
    trials all failed (diverged): the searched values train no model, and a study would otherwise try forever."""
    from optuna.trial import TrialState

    in_a_row = 0

    def stop(study, trial) -> None:
        nonlocal in_a_row
        surplus = trial.user_attrs.get("surplus")
        in_a_row = in_a_row + 1 if trial.state == TrialState.FAIL and not surplus else 0
        if _finished(study) >= trials:
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


def _counted(study) -> list[Any]:
    """Trials that count towards the study's total: finished (completed, pruned) or running, surplus ones aside."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("surplus")]


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _sampler_seed(seed: int, existing: int, shared: bool) -> int:
    """The sampler's seed: `seed` moved on by the trials already in the study (a resumed study does not draw its
    first values again), and on a shared storage mixed with this process, so that processes draw apart."""
    mix = f"{seed}:{existing}:{socket.gethostname()}:{os.getpid()}" if shared else f"{seed}:{existing}"
    return int.from_bytes(hashlib.sha256(mix.encode()).digest()[:4], "big")


def _check_dimension(base: RunConfig, dimension: Dimension) -> None:
    samples = list(dimension.choices) if dimension.kind == "categorical" else [dimension.low, dimension.high]
    if dimension.kind == "int":
        samples = [int(v) for v in samples]
    for value in samples:
        try:
            build_config(base, {dimension.key: value})
        except ConfigError as exc:
            raise ConfigError(f"search space: {dimension.key} = {value!r} is not a valid setting here: {exc}") from None


def _space_text(dimension: Dimension) -> str:
    if dimension.kind == "categorical":
        return "one of " + ", ".join(map(str, dimension.choices))
    scale = ", log scale" if dimension.log else ""
    return f"{dimension.kind} {_show(dimension.low)} .. {_show(dimension.high)}{scale}"


def _safe_url(url: str) -> str:
    """The storage URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _blank(value: Any) -> Any:
    return "" if value is None else value
