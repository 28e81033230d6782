"""What the diagnosis returns: one `Verdict` per finding, and the phrases its evidence lines share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imgclf.evaluation.diagnose.thresholds import LIST_LIMIT

__all__ = ["Verdict", "listed", "on_images"]


@dataclass(frozen=True)
class Verdict:
    """One finding about a run.

    Attributes:
        kind: one of VERDICT_KINDS.
        title: one line for a person, e.g. "Overfitting from epoch 12".
        evidence: the numbers behind the finding, one sentence each, with the images behind them.
        next_steps: what to try, as commands that run as printed, most supported by the evidence first.
        epoch: the epoch the finding points at (overfitting: its onset; good fit: the best epoch; unstable: the
            first jump), or None.
    """

    kind: str
    title: str
    evidence: tuple[str, ...]
    next_steps: tuple[str, ...]
    epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form: {"kind", "title", "evidence": [...], "next_steps": [...], "epoch"}."""
        return {
            "kind": self.kind,
            "title": self.title,
            "evidence": list(self.evidence),
            "next_steps": list(self.next_steps),
            "epoch": self.epoch,
        }


def on_images(n: int | None) -> str:
    """ " on N images", or nothing when the number is unknown."""
    return f" on {n} images" if n else ""


def listed(items: Sequence[Any]) -> str:
    """The first `LIST_LIMIT` items, comma-separated, then "and N more"."""
    shown = ", ".join(str(item) for item in items[:LIST_LIMIT])
    return shown + (f" and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else "")
