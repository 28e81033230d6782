"""What the diagnosis knows about a run beyond its history (`RunFacts`), and the leaks read from `duplicates.csv`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunFacts", "count_leaks", "read_leaks", "read_near_leaks"]


@dataclass(frozen=True)
class RunFacts:
    """What the diagnosis knows beyond the history; None (or empty) = unknown, and the rules needing it are skipped.

    Attributes:
        train_counts: training images per class.
        per_class_recall: test (or val) recall per class; `per_class_support` the images behind each.
        leaks: identical images in different splits, as (path, split, path, split).
        near_leaks: near-duplicates in different splits, as (path, split, path, split, distance).
        val_images, test_images: split sizes.
        val_accuracy, test_accuracy: the selected model's final accuracy on each.
        config: the run's resolved configuration (a `RunConfig`): next steps name its current values and never
            repeat them.
        pretrained_available: model names whose pretrained weights are available offline here.
        data: the data folder as the user can type it; `run` the run folder.
    """

    train_counts: Mapping[str, int] | None = None
    per_class_recall: Mapping[str, float] | None = None
    per_class_support: Mapping[str, int] | None = None
    leaks: Sequence[tuple[str, str, str, str]] = ()
    near_leaks: Sequence[tuple[str, str, str, str, float]] = ()
    val_images: int | None = None
    test_images: int | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    config: Any = None
    pretrained_available: Sequence[str] | None = None
    data: str = "DATA"
    run: str = "RUN"
    extra: Mapping[str, Any] = field(default_factory=dict)


def read_leaks(path: Path | str, kind: str = "exact") -> list[tuple[str, str, str, str]]:
    """Images of one content in different splits from a run's `duplicates.csv`: (path, split, path, split) each;
    `kind` exact (identical files) or near (near-duplicates)."""
    from imgclf.data.leaks import read_duplicates

    return [
        (row.get("path_a", ""), row.get("split_a", ""), row.get("path_b", ""), row.get("split_b", ""))
        for row in read_duplicates(path)
        if row.get("issue") == "leak across splits" and row.get("kind") == kind
    ]


def read_near_leaks(path: Path | str) -> list[tuple[str, str, str, str, float]]:
    """Near-duplicates in different splits from a run's `duplicates.csv`: (path, split, path, split, distance)."""
    from imgclf.data.leaks import read_duplicates

    return [
        (row["path_a"], row["split_a"], row["path_b"], row["split_b"], float(row.get("distance") or 0))
        for row in read_duplicates(path)
        if row.get("issue") == "leak across splits" and row.get("kind") == "near"
    ]


def count_leaks(path: Path | str) -> int:
    """Pairs of identical or near-duplicate images in different splits, from a run's `duplicates.csv` (0 when the
    file is absent).

    Example:
        >>> count_leaks("runs/small_cnn-20261128-120000/duplicates.csv")
        0
    """
    return len(read_leaks(path)) + len(read_near_leaks(path))
