"""A configuration built and validated from a base and dotted overrides, read from and written to YAML (with each
key's meaning as a comment); validation errors name the key, what was expected and what was received."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from imgclf.config.keys import unknown_key
from imgclf.config.sections import RunConfig
from imgclf.config.text import NULL
from imgclf.errors import ConfigError
from imgclf.files import write_text_atomic

__all__ = ["build_config", "dump_config", "load_config", "read_config_file", "save_config"]


def build_config(
    base: RunConfig | Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Validate a configuration from a base (model, nested dict or None) plus dotted overrides.

    Args:
        base: a `RunConfig`, a nested mapping as in `config.yaml`, or None for the defaults.
        overrides: `{"train.epochs": 5, "model.name": "resnet18"}`; None values are ignored (a flag not given),
            `NULL` sets a key to null (`--set train.early_stopping.patience=null`).

    Returns:
        A new validated `RunConfig`.

    Raises:
        ConfigError: naming the key, what was expected and what was received.

    Example:
        >>> build_config(None, {"train.epochs": 3}).train.epochs
        3
    """
    tree = base.model_dump(mode="python") if isinstance(base, RunConfig) else _plain(base or {})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if value is NULL:  # `--set key=null`: the setting is given, and it is null
            value = None
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set '{dotted}': '{key}' is a value, not a section")
            node = child
        node[leaf] = value
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_config(path: Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML config file (any subset of the sections) and apply dotted overrides on top."""
    return build_config(read_config_file(path), overrides)


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config file's nested mapping of sections; a missing, invalid or non-mapping file: a ConfigError."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections; received {type(tree).__name__}")
    return tree


def dump_config(config: RunConfig, *, comments: bool = True) -> str:
    """YAML text of a config; with `comments`, each key carries its one-line meaning."""
    lines: list[str] = []
    _dump_section(config, lines, indent=0, comments=comments)
    return "\n".join(lines) + "\n"


def save_config(config: RunConfig, path: Path) -> None:
    write_text_atomic(path, dump_config(config))


def _dump_section(section: BaseModel, lines: list[str], indent: int, comments: bool) -> None:
    pad = "  " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            doc = _summary(type(value).__doc__) if comments else ""
            if indent == 0 and lines:
                lines.append("")
            lines.append(f"{pad}{name}:" + (f"  # {doc}" if doc else ""))
            _dump_section(value, lines, indent + 1, comments)
            continue
        plain = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
        text = yaml.safe_dump(plain, default_flow_style=True, width=1000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        line = f"{pad}{name}: {text}"
        if comments and field.description:
            line = f"{line:<40}  # {field.description}"
        lines.append(line)


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _plain(value) if isinstance(value, Mapping) else value for key, value in tree.items()}


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "config"
        if error["type"] == "extra_forbidden":
            problems.append(unknown_key(where))
            continue
        message = error["msg"].removeprefix("Value error, ")
        if "received" in message or (error["type"] == "value_error" and isinstance(error.get("input"), Mapping)):
            problems.append(f"{where}: {message}")  # a validator of ours already names what it received
        else:
            problems.append(f"{where}: {message}; received {error.get('input')!r}")
    return "invalid configuration: " + "; ".join(problems)


def _summary(doc: str | None) -> str:
    """A docstring's first sentence, whole (it may run over several lines)."""
    text = " ".join((doc or "").split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]
