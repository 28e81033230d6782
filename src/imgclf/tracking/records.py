"""Reading a run's records back: its JSON files (metrics.json, env.json, model.json), history.csv as numbers, and
a nested config as dotted keys. What the runs table, `imgclf runs compare` and the tracking sinks read a run
folder with; a missing or unreadable file reads as empty, so a run that is unfinished, stopped or failed still
reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgclf.files import read_csv

__all__ = ["flatten", "read_history", "read_json"]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run folder's file; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_history(path: Path) -> list[dict[str, Any]]:
    """history.csv's rows with numbers as numbers (integers where written without a point) and blanks as None;
    [] when the file is missing or unreadable."""
    try:
        rows = read_csv(path)
    except OSError:
        return []
    return [{key: _number(value) for key, value in row.items()} for row in rows]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.002}} -> {"train.lr": 0.002}: a nested config as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(text: str) -> Any:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text if text != "" else None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
