"""Run folder -> `report.html` (one self-contained file: figures embedded) and `report.md` (figures in `report/`).

Everything comes from files the run wrote: config.yaml, env.json, manifest.csv, problems.csv, duplicates.csv,
history.csv, metrics.json, predictions.csv, calibration.json and the `model/` bundle (for Grad-CAM). The
checkpoints are not needed, so a report can be rebuilt, identically, wherever the run folder and its images are.

The steps: 1. read the run, 2. diagnose it, 3. draw one figure per question a reader asks (`report_figures`),
4. render both files.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.leaks import read_duplicates
from imgclf.data.split import SplitManifest
from imgclf.errors import DataError
from imgclf.evaluation.diagnose import (
    PRETRAINED_CANDIDATES,
    RunFacts,
    Verdict,
    diagnose,
    read_history,
    read_leaks,
    read_near_leaks,
)
from imgclf.evaluation.label_issues import read_label_issues
from imgclf.evaluation.report_figures import (
    DPI,
    MAX_GRADCAM,
    MAX_MISTAKES,
    MAX_PAIRS,
    MAX_SAMPLE_CLASSES,
    SAMPLES_PER_CLASS,
    THUMBNAIL,
    Figure,
    draw_figures,
    loss_note,
)
from imgclf.files import read_csv, write_bytes_atomic, write_text_atomic
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tracking.runs import RunPaths, find_run

__all__ = [
    "DPI",
    "MAX_GRADCAM",
    "MAX_MISTAKES",
    "MAX_PAIRS",
    "MAX_ROWS",
    "MAX_SAMPLE_CLASSES",
    "SAMPLES_PER_CLASS",
    "THUMBNAIL",
    "Figure",
    "Report",
    "RunRecord",
    "build_report",
    "diagnose_run",
    "draw_figures",
    "pretrained_available",
    "read_run",
    "typed_path",
]

log = logging.getLogger(__name__)

MAX_ROWS = 20  # problems / duplicates listed in the report; the CSVs hold all


@dataclass(frozen=True)
class RunRecord:
    """What the run folder says, read once."""

    paths: RunPaths
    config: dict[str, Any]
    config_text: str
    env: dict[str, Any]
    model: dict[str, Any]
    manifest: SplitManifest
    problems: list[dict[str, str]]
    duplicates: list[dict[str, str]]
    label_issues: list[dict[str, str]]
    label_summary: dict[str, Any] | None
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    predictions: list[dict[str, str]]
    probs: np.ndarray  # [n readable predictions, classes], rows in the order of `readable`
    readable: list[dict[str, str]]
    calibration: dict[str, Any] | None

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.model["classes"])

    @cached_property
    def y_true(self) -> np.ndarray:
        """Class indices of the readable predictions."""
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[row["true"]] for row in self.readable], dtype=np.int64)

    @property
    def temperature(self) -> float:
        return float(self.metrics.get("temperature", 1.0))

    @cached_property
    def uncalibrated_probs(self) -> np.ndarray:
        """The model's own probabilities: softmax(log p * T) undoes the fitted softmax(z / T)."""
        from imgclf.evaluation.calibration import apply_temperature

        return apply_temperature(self.probs, 1.0 / self.temperature)


@dataclass(frozen=True)
class Report:
    """Where the report went and what it concluded."""

    html: Path
    markdown: Path
    verdicts: tuple[Verdict, ...]


def build_report(run: Path | str, *, device: Any = "cpu", progress: Progress = NO_PROGRESS) -> Report:
    """Write `report.html`, `report.md` and `report/*.png` into a run folder, from its files alone.

    Args:
        run: the run folder.
        device: where Grad-CAM runs the model.
        progress: progress reporter.

    Returns:
        The two report files and the diagnosis.

    Example:
        >>> build_report("runs/small_cnn-20261128-120000").html
        PosixPath('runs/small_cnn-20261128-120000/report.html')
    """
    # 1. read
    record = read_run(find_run(Path(run)))
    # 2. diagnose
    verdicts = tuple(diagnose_run(record))
    # 3. draw
    figures = draw_figures(record, device=device, progress=progress)
    # 4. render
    context = _context(record, verdicts, figures)
    paths = record.paths
    html = _template("report.html.j2").render(**context, embed=True)
    markdown = _template("report.md.j2").render(**context, embed=False, assets=paths.report_assets.name)
    paths.report_assets.mkdir(exist_ok=True)
    for figure in figures.values():
        write_bytes_atomic(paths.report_assets / f"{figure.name}.png", figure.png)
    write_text_atomic(paths.report_html, html)
    write_text_atomic(paths.report_md, markdown)
    log.info("report: %s (and %s)", paths.report_html, paths.report_md.name)
    return Report(paths.report_html, paths.report_md, verdicts)


def read_run(paths: RunPaths) -> RunRecord:
    """Read every file the report uses; a missing required file is named with the command that makes it."""
    import yaml

    for required, how in (
        (paths.history, "imgclf train"),
        (paths.metrics, f"imgclf evaluate {paths.root}"),
        (paths.predictions, f"imgclf evaluate {paths.root}"),
        (paths.model / "model.json", "imgclf train"),
    ):
        if not required.exists():
            raise DataError(f"cannot build the report: {required} is missing (it is written by `{how}`)")
    config_text = paths.config.read_text(encoding="utf-8") if paths.config.exists() else ""
    model = json.loads((paths.model / "model.json").read_text(encoding="utf-8"))
    classes = model["classes"]
    predictions = read_csv(paths.predictions)
    readable = [row for row in predictions if not row.get("error")]
    if readable and f"p_{classes[0]}" not in readable[0]:
        raise DataError(
            f"{paths.predictions} has no probability columns (written by an older imgclf); run "
            f"`imgclf evaluate {paths.root}` once to rewrite it"
        )
    probs = np.array([[float(row[f"p_{name}"]) for name in classes] for row in readable], dtype=np.float64)
    return RunRecord(
        paths=paths,
        config=yaml.safe_load(config_text) or {},
        config_text=config_text,
        env=_read_json(paths.env) or {},
        model=model,
        manifest=SplitManifest.load(paths.manifest),
        problems=read_csv(paths.problems) if paths.problems.exists() else [],
        duplicates=read_duplicates(paths.duplicates),
        label_issues=read_label_issues(paths.label_issues),
        label_summary=_read_json(paths.label_issues_summary),
        history=read_history(paths.history),
        metrics=_read_json(paths.metrics) or {},
        predictions=predictions,
        probs=probs.reshape(len(readable), len(classes)),
        readable=readable,
        calibration=_read_json(paths.calibration),
    )


def diagnose_run(record: RunRecord) -> list[Verdict]:
    """The diagnosis with the run's facts: split sizes, train counts, per-class recall and support, identical files
    across splits, val vs test, the resolved config, and the pretrained weights found offline."""
    per_class = record.metrics.get("per_class", {})
    history = record.history
    val_accuracies = [row["val_acc"] for row in history if row.get("val_acc") is not None]
    best_epoch = record.model.get("training", {}).get("best_epoch")
    val_accuracy = None
    if val_accuracies:
        best = [row for row in history if row["epoch"] == best_epoch and row.get("val_acc") is not None]
        val_accuracy = best[0]["val_acc"] if best else max(val_accuracies)
    on_test = record.metrics.get("split", "test") == "test"
    facts = RunFacts(
        train_counts=dict(record.manifest.counts()["train"]),
        per_class_recall={name: values["recall"] for name, values in per_class.items() if values["support"]},
        per_class_support={name: int(values["support"]) for name, values in per_class.items()},
        leaks=read_leaks(record.paths.duplicates),
        near_leaks=read_near_leaks(record.paths.duplicates),
        val_images=len(record.manifest.split("val")) or None,
        test_images=record.metrics.get("n") if on_test else None,
        val_accuracy=val_accuracy,
        test_accuracy=record.metrics.get("accuracy") if on_test else None,
        config=_run_config(record.config),
        pretrained_available=pretrained_available(),
        data=typed_path(record.env["data"]) if record.env.get("data") else "DATA",
        run=typed_path(record.paths.root),
    )
    return diagnose(history, facts)


def typed_path(path: Path | str) -> str:
    """A path as the user can type it here: relative to the working directory when below it, else absolute."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(absolute)


def pretrained_available() -> list[str]:
    """The candidate pretrained models whose weights are found here without a network (an installed weights
    package, the Hugging Face cache)."""
    from imgclf.models.weights import offline_sources

    return [name for name in PRETRAINED_CANDIDATES if offline_sources(name)]


def _run_config(config: Mapping[str, Any]):
    from imgclf.config import build_config
    from imgclf.errors import ConfigError

    try:
        return build_config(dict(config))
    except ConfigError:  # a config.yaml from another imgclf version: advice without current values
        return None


# --- text -------------------------------------------------------------------------------------------------------


def _context(record: RunRecord, verdicts: Sequence[Verdict], figures: Mapping[str, Figure]) -> dict[str, Any]:
    """Everything the templates print, computed here so that the templates only lay it out."""
    metrics = record.metrics
    counts = record.manifest.counts()
    classes = record.classes
    train_counts = [counts["train"].get(name, 0) for name in classes]
    history = record.history
    seconds = sum(row.get("seconds") or 0 for row in history)
    speeds = [row["images_per_s"] for row in history if row.get("images_per_s")]
    training = record.model.get("training", {})
    config_train = record.config.get("train", {})
    headline = [
        ("accuracy", metrics.get("accuracy")),
        ("balanced accuracy", metrics.get("balanced_accuracy")),
        ("macro F1", metrics.get("macro_f1")),
        ("top-3 accuracy", metrics.get("top3_accuracy")),
        ("top-5 accuracy", metrics.get("top5_accuracy")),
        ("ROC-AUC (one-vs-rest, macro)", metrics.get("roc_auc_ovr")),
        ("log loss", metrics.get("log_loss")),
        ("expected calibration error", metrics.get("ece")),
    ]
    train_images = sum(counts["train"].values())
    last = history[-1] if history else {}
    return {
        "run": record.paths.root.name,
        "run_path": shlex.quote(typed_path(record.paths.root)),
        "dev_run": bool(record.env.get("fast_dev_run")),
        "steps_line": _steps_line(last, train_images, config_train.get("batch_size")),
        "loss_note": loss_note(record.config),
        "ece_note": _ece_note(record.config, metrics, record.probs),
        "model_name": record.model.get("arch", {}).get("name", "?"),
        "classes": classes,
        "split": metrics.get("split", "test"),
        "n_eval": metrics.get("n", len(record.readable)),
        "skipped_eval": metrics.get("skipped", 0),
        "tta": metrics.get("tta", False),
        "temperature": metrics.get("temperature", 1.0),
        "headline": [(name, _fmt(value)) for name, value in headline if value is not None],
        "verdicts": verdicts,
        "splits": [split for split in ("train", "val", "test") if sum(counts[split].values())],
        "counts": {split: {name: counts[split].get(name, 0) for name in classes} for split in counts},
        "totals": {split: sum(counts[split].values()) for split in counts},
        "imbalance": _fmt(max(train_counts) / max(min(train_counts), 1)) if train_counts else "n/a",
        "problems": record.problems[:MAX_ROWS],
        "problem_count": len(record.problems),
        "duplicates": record.duplicates[:MAX_ROWS],
        "duplicate_count": len(record.duplicates),
        "near_duplicate_count": sum(row.get("kind") == "near" for row in record.duplicates),
        "label_issues": _label_issue_lines(record),
        "epochs_run": len(history),
        "epochs_planned": config_train.get("epochs", len(history)),
        "best_epoch": training.get("best_epoch"),
        "phases": _phases(history),
        "train_seconds": f"{seconds:.1f}",
        "images_per_s": f"{sum(speeds) / len(speeds):,.0f}" if speeds else "n/a",
        "per_class": [
            {"name": name, **{k: _fmt(v) for k, v in values.items()}}
            for name, values in metrics.get("per_class", {}).items()
        ],
        "most_confused": metrics.get("most_confused", [])[:10],
        "calibration": _calibration_rows(record),
        "figures": figures,
        "config_text": record.config_text,
        "environment": _environment(record.env),
    }


def _label_issue_lines(record: RunRecord) -> dict[str, Any] | None:
    """What the report says about label issues: None when the run did not look (data.label_issues)."""
    summary = record.label_summary
    if summary is None:
        return None
    data = shlex.quote(typed_path(record.env["data"])) if record.env.get("data") else "DATA"
    return {
        "flagged": summary.get("flagged", len(record.label_issues)),
        "images": summary.get("images"),
        "estimated": summary.get("estimated_by_confident_learning"),
        "accuracy": summary.get("out_of_fold_accuracy"),
        "method": summary.get("method", ""),
        "skipped": summary.get("skipped"),
        "exclude": f"imgclf train {data} --exclude {shlex.quote(typed_path(record.paths.label_issues))}",
        "top": record.label_issues[:MAX_ROWS],
    }


def _steps_line(last: Mapping[str, Any], train_images: int, batch_size: Any) -> str:
    """Optimizer steps per epoch, the batch, and any training images left out of each epoch."""
    from imgclf.config import MIN_STEPS_PER_EPOCH

    steps, seen = last.get("steps"), last.get("train_images")
    if steps is None:
        return f"Batch size {batch_size}."
    line = (
        f"{int(steps)} optimizer steps per epoch (batch {batch_size}, {int(seen or 0)} of {train_images} training "
        "images)."
    )
    if steps < MIN_STEPS_PER_EPOCH:
        line += (
            f" Fewer than {MIN_STEPS_PER_EPOCH} steps per epoch: the model is updated a few times per epoch, so "
            "the curves below move in large jumps and say little; a smaller batch gives more steps."
        )
    return line


def _ece_note(config: Mapping[str, Any], metrics: Mapping[str, Any], probs: np.ndarray) -> str:
    """Why a model trained with label smoothing shows a calibration error even when its answers are right."""
    smoothing = config.get("train", {}).get("label_smoothing") or 0
    classes = len(metrics.get("per_class", {})) or 2
    if not smoothing or metrics.get("ece") is None or not len(probs):
        return ""
    target = 1 - smoothing + smoothing / classes
    confidence, accuracy = float(probs.max(axis=1).mean()), float(metrics.get("accuracy", 0.0))
    note = (
        f"This model was trained with label smoothing {smoothing:g}: its target for the true class was "
        f"{target:.3f}, not 1, so it learns to be less sure than it is right."
    )
    if confidence < accuracy:
        return note + (
            f" Here its mean confidence {confidence:.3f} is below its accuracy {accuracy:.3f}: most of the ECE "
            f"({metrics['ece']:.3f}) is that under-confidence, expected even at 100 % accuracy (the bars sit above "
            "the diagonal). `--calibrate` corrects it when the validation split is large enough."
        )
    return note + (
        f" Even so its mean confidence {confidence:.3f} is above its accuracy {accuracy:.3f}: the ECE "
        f"({metrics['ece']:.3f}) is over-confidence, which smoothing did not prevent."
    )


def _phases(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive epochs with the same phase: [{phase, first, last}]."""
    phases: list[dict[str, Any]] = []
    for row in history:
        if phases and phases[-1]["phase"] == row.get("phase"):
            phases[-1]["last"] = row["epoch"]
        else:
            phases.append({"phase": row.get("phase") or "train", "first": row["epoch"], "last": row["epoch"]})
    return phases


def _calibration_rows(record: RunRecord) -> list[tuple[str, str, str]]:
    """(what, before, after) rows when a temperature was fitted (kept or refused)."""
    calibration = record.calibration
    if not calibration:
        return []
    from imgclf.evaluation.metrics import expected_calibration_error

    n = calibration["n"]
    rows = []
    if calibration.get("kept", True):
        rows.append(("temperature", "1", _fmt(calibration["temperature"])))
    else:
        rows.append(
            (
                f"temperature refused ({calibration.get('refused_because')}); the model stays at T = 1",
                "1",
                f"{_fmt(calibration['temperature'])} (not kept)",
            )
        )
    rows.append(
        (f"ECE, val ({n} images, fitted here)", _fmt(calibration["ece_before"]), _fmt(calibration["ece_after"]))
    )
    if record.temperature != 1.0:
        y_true = record.y_true
        split = record.metrics.get("split", "test")
        rows.append(
            (
                f"ECE, {split} ({len(y_true)} images)",
                _fmt(expected_calibration_error(y_true, record.uncalibrated_probs)),
                _fmt(expected_calibration_error(y_true, record.probs)),
            )
        )
    rows.append(
        (f"log loss, val ({n} images)", _fmt(calibration["log_loss_before"]), _fmt(calibration["log_loss_after"]))
    )
    return rows


def _environment(env: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows of env.json: device and imgclf version first, the repository commit with its label."""
    labels = {"device": "device", "imgclf_version": "imgclf version"}
    rows = [(label, str(env[key])) for key, label in labels.items() if env.get(key) is not None]
    repository, heading = env.get("repository"), "repository commit (git, of the working directory)"
    if isinstance(repository, dict):  # older runs have an unlabelled git_commit instead, shown as it is below
        state = {True: "uncommitted changes", False: "clean"}.get(repository.get("dirty"), "state unknown")
        rows.append((heading, f"{repository.get('commit') or 'no commit yet'} ({state}) in {repository.get('path')}"))
    elif "repository" in env:
        rows.append((heading, "none: not started in a git repository"))
    plain = [(key, value) for key, value in env.items() if not isinstance(value, (dict, list))]
    rows += [(key, str(value)) for key, value in plain if key not in {"cwd", *labels}]
    rows += [(f"{name}", str(version)) for name, version in env.get("packages", {}).items()]
    if env.get("command"):
        rows.append(("command", " ".join(env["command"])))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return "" if value is None else str(value)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rerun the command that writes it") from None


def _code_spans(text: str):
    """HTML for a verdict line: escaped, with `flag` spans as <code> (the diagnosis writes flags in backticks)."""
    import markupsafe

    escaped = str(markupsafe.escape(text))
    return markupsafe.Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped))


def _template(name: str):
    import jinja2

    source = resources.files("imgclf.evaluation").joinpath(name).read_text(encoding="utf-8")
    environment = jinja2.Environment(
        autoescape=name.endswith(".html.j2"), trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    environment.filters["md"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    environment.filters["code"] = _code_spans
    return environment.from_string(source)
