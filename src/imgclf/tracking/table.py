"""The runs table: what `imgclf runs` shows, from run folders only (their status, config, history, metrics and
model.json); `data_fingerprint` names the exact images and split a run used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgclf.errors import ConfigError, DataError
from imgclf.files import read_csv
from imgclf.tracking.paths import DEV_RUN_PREFIX, LATEST, RunPaths
from imgclf.tracking.records import read_history, read_json
from imgclf.tracking.status import read_status

__all__ = ["RUN_COLUMNS", "data_fingerprint", "list_runs", "sort_runs", "summarize_run"]

# Columns of the runs table (and keys of `--json`'s records); `--sort` also takes any test metric's name.
RUN_COLUMNS = (
    "name",
    "status",
    "started",
    "model",
    "data",
    "epochs",
    "best_epoch",
    "best_val_acc",
    "best_val_loss",
    "test_acc",
    "minutes",
)


def list_runs(folder: Path, *, include_dev_runs: bool = False) -> list[dict[str, Any]]:
    """One summary per run folder directly inside `folder` (see `summarize_run`), oldest first; folders that are
    not runs (no config.yaml) and the `latest` link are left out, and so are fast dev runs unless asked for.

    Raises:
        DataError: `folder` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"runs folder not found: {folder} (train writes runs into --out, default runs/)")
    summaries = []
    for entry in sorted(folder.iterdir()):
        if entry.name == LATEST or not (entry / "config.yaml").is_file():
            continue
        if entry.name.startswith(DEV_RUN_PREFIX) and not include_dev_runs:
            continue
        summaries.append(summarize_run(entry))
    return sorted(summaries, key=lambda s: s["started"] or "")


def summarize_run(path: Path) -> dict[str, Any]:
    """A run folder in one record: its status (crashed when a "running" run's process is gone), when it started,
    model, data fingerprint (the same for runs on the same images and split), epochs done of planned, the best
    epoch's validation accuracy and loss, test accuracy, minutes of training, and every numeric test metric under
    `metrics`. Reads the folder only; a run that is unfinished, stopped or failed has blanks (None) where its files
    are missing."""
    import yaml

    paths = RunPaths(Path(path))
    status = read_status(paths)
    try:
        config = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    history = read_history(paths.history)
    metrics = read_json(paths.metrics)
    best = _best_row(history, config, read_json(paths.model / "model.json").get("training") or {})
    planned = (config.get("train") or {}).get("epochs")
    seconds = status.get("seconds")
    if seconds is None or status.get("status") == "running":
        seconds = sum(row.get("seconds") or 0.0 for row in history) or None
    env = read_json(paths.env)
    return {
        "name": paths.root.name,
        "path": str(paths.root),
        "status": status.get("status"),
        "reason": status.get("reason"),
        "started": status.get("started") or env.get("started"),
        "model": (config.get("model") or {}).get("name"),
        "pretrained": bool((config.get("model") or {}).get("pretrained")),
        "data": data_fingerprint(paths.manifest),
        "epochs": len(history),
        "epochs_planned": planned,
        "best_epoch": best.get("epoch"),
        "best_val_acc": best.get("val_acc"),
        "best_val_loss": best.get("val_loss"),
        "test_acc": metrics.get("accuracy"),
        "minutes": round(seconds / 60, 3) if seconds else None,
        "metrics": {key: v for key, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "dev_run": paths.root.name.startswith(DEV_RUN_PREFIX),
    }


def sort_runs(summaries: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Runs ordered by a column or a test metric: numbers best first (losses and ECE low, the rest high), text
    A to Z; runs without the value last.

    Raises:
        ConfigError: `key` is neither a column nor a metric of any run.
    """
    metric_names = sorted({name for s in summaries for name in s["metrics"]})
    if key not in RUN_COLUMNS and key not in metric_names:
        raise ConfigError(
            f"--sort takes a column ({', '.join(RUN_COLUMNS)}) or a test metric "
            f"({', '.join(metric_names) or 'none recorded yet'}); received '{key}'"
        )

    def value(summary: dict[str, Any]) -> Any:
        return summary.get(key) if key in RUN_COLUMNS else summary["metrics"].get(key)

    present = [s for s in summaries if value(s) is not None]
    missing = [s for s in summaries if value(s) is None]
    numeric = all(isinstance(value(s), (int, float)) for s in present)
    low_first = any(word in key for word in ("loss", "ece", "minutes", "started", "name"))
    return sorted(present, key=value, reverse=numeric and not low_first) + missing


def data_fingerprint(manifest: Path) -> str | None:
    """12 hex digits naming the exact images and split of a run (sha256 over its manifest's split, label and
    file hash, in order): two runs with the same fingerprint trained and tested on the same data."""
    import hashlib

    try:
        rows = read_csv(manifest)
    except OSError:
        return None
    digest = hashlib.sha256()
    for row in sorted((r.get("split", ""), r.get("label", ""), r.get("sha256", "")) for r in rows):
        digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()[:12]


def _best_row(history: list[dict[str, Any]], config: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The epoch the run kept, as model.json's `training` records it (its epoch, and with `weights: ema` the
    averaged weights' validation figures); before the run has shipped a model, the best row by its early-stopping
    monitor, as the checkpointer chooses."""
    kept = next((row for row in history if row.get("epoch") == training.get("best_epoch")), None)
    if kept is not None:
        if training.get("weights") == "ema":
            return {**kept, "val_acc": kept.get("val_acc_ema"), "val_loss": kept.get("val_loss_ema")}
        return kept
    stopping = ((config.get("train") or {}).get("early_stopping")) or {}
    monitor = stopping.get("monitor", "val_loss")
    rows = [row for row in history if isinstance(row.get(monitor), float) and row[monitor] == row[monitor]]
    if not rows:
        return {}
    mode = stopping.get("mode", "auto")
    highest = mode == "max" or (mode == "auto" and monitor.endswith("acc"))
    return (max if highest else min)(rows, key=lambda row: row[monitor])
