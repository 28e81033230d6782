"""The search space of `imgclf tune`: which configuration keys a study searches and the values each may take,
from a YAML file or a mapping, checked against the configuration before any trial runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.config import RunConfig, build_config, check_key
from imgclf.errors import ConfigError

__all__ = ["DEFAULT_SPACE", "Dimension", "check_dimension", "load_space"]

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


def check_dimension(base: RunConfig, dimension: Dimension) -> None:
    """Prove that every value of `dimension` (each choice, or both ends of a range) makes a valid configuration
    over `base`, before any trial runs.

    Raises:
        ConfigError: a value that is not a valid setting, with the configuration's own reason.
    """
    samples = list(dimension.choices) if dimension.kind == "categorical" else [dimension.low, dimension.high]
    if dimension.kind == "int":
        samples = [int(v) for v in samples]
    for value in samples:
        try:
            build_config(base, {dimension.key: value})
        except ConfigError as exc:
            raise ConfigError(f"search space: {dimension.key} = {value!r} is not a valid setting here: {exc}") from None


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
