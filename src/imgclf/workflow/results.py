"""What the workflow functions return: `TrainResult` (train, resume, reproduce), `EvalResult` (evaluate) and
`SplitResult` (split)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.data.scan import Problem

__all__ = ["EvalResult", "SplitResult", "TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """Where the run is and how it went."""

    run_dir: Path
    metrics: dict[str, Any] | None
    history: list[dict[str, float]]
    best_epoch: int | None  # the epoch of the weights the run kept
    stop_reason: str | None
    report: Any = None  # evaluation.report.Report: report.html, report.md and the diagnosis; None with report=False
    weights: str = "raw"  # which weights it kept: raw (the model's) or ema (their moving average, train.ema)


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one split, and the folder holding metrics.json and its companions."""

    metrics: dict[str, Any]
    out_dir: Path


@dataclass(frozen=True)
class SplitResult:
    """What `split()` wrote."""

    target: Path
    counts: dict[str, int]
    problems: tuple[Problem, ...]
    duplicates: int  # identical or near-duplicate pairs across splits (a folder split by hand) or labels
    near_duplicates: int = 0  # near-duplicate pairs found (each kept in one split)
