"""Settings written as text, before any model sees them: durations (`10m`), `--set KEY=VALUE` values, and `NULL`
(a key set to null, where None means "not given")."""

from __future__ import annotations

from typing import Any

import yaml

from imgclf.errors import ConfigError

__all__ = ["NULL", "parse_assignments", "parse_duration"]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float | int, what: str = "--time") -> float:
    """Seconds in a duration written `90s`, `10m`, `2h`, `1.5h` or a plain number of seconds.

    Raises:
        ConfigError: naming `what`, the expected form and what was received.

    Example:
        >>> [parse_duration(t) for t in ("90s", "10m", "1.5h", 45)]
        [90.0, 600.0, 5400.0, 45.0]
    """
    raw = str(text).strip().lower()
    unit = raw[-1:] if raw[-1:] in _DURATION_UNITS else "s"
    number = raw[:-1] if raw[-1:] in _DURATION_UNITS else raw
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{what} takes a positive duration such as 90s, 10m or 2h; received '{text}'")
    return seconds


class _Null:
    """An override that sets a key to null, where None means "not given" (`parse_assignments` makes it)."""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()

_YAML_WORDS = frozenset({"on", "off", "yes", "no", "y", "n"})


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=0.01", "augment.hflip=false"]` into dotted overrides; values are parsed as YAML."""
    result: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE such as train.lr=0.01; received '{item}'")
        text = raw.strip()
        # YAML 1.1 reads on/off/yes/no as booleans; here they are words (data.cache=off), only true/false are not
        value = text if text.lower() in _YAML_WORDS else yaml.safe_load(raw) if text else None
        result[key.strip()] = NULL if value is None else value
    return result
