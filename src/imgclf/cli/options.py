"""The options several commands share, the `training_options` decorator that gives `train` and `tune` every
flag of the one table (`imgclf.flags`), and the config built from a command's flags."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from imgclf.flags import FLAGS, Flag, flag_for, flags_by_param

__all__ = [
    "FLAG_KEYS",
    "BatchOption",
    "ConfigOption",
    "DeviceOption",
    "ExcludeOption",
    "FreezeOption",
    "GroupsCsvOption",
    "GroupsOption",
    "ImgSizeOption",
    "ModelOption",
    "PretrainedOption",
    "SetOption",
    "SubsetOption",
    "TTAOption",
    "WeightsOption",
    "config_flags",
    "examples",
    "flag_name",
    "flag_option",
    "run_config_from",
    "settings_from",
    "training_options",
]

FLAGS_BY_PARAM = flags_by_param()


def examples(*commands: str) -> str:
    """An epilog for `--help` listing example command lines."""
    return "\n\n".join(["Examples:", *commands])


# The config key behind each command-line flag of the table, by the command function's parameter name.
FLAG_KEYS = {flag.param: flag.key for flag in FLAGS}


def config_flags(params: dict[str, Any]) -> dict[str, Any]:
    """{config key: value} for the flags among a command's parameters (None = not given)."""
    return {key: params[name] for name, key in FLAG_KEYS.items() if name in params}


def flag_name(key: str) -> str:
    """The flag of a config key (`train.lr` -> `--lr`), or `--set key` for keys without one."""
    return flag_for(key)


def flag_option(flag: Flag) -> Any:
    """The typer annotation of a table flag: its spelling, help, panel, and None as "not given"."""
    names = [flag.switch] if flag.switch else ["--" + flag.param.rstrip("_").replace("_", "-")]
    extra = {"min": flag.min} if flag.min is not None else {}
    return Annotated[
        flag.type | None, typer.Option(*names, help=flag.help, rich_help_panel=flag.panel, show_default=False, **extra)
    ]


# Options that several commands share: those of the table from it, the others here.
ModelOption = flag_option(FLAGS_BY_PARAM["model"])
PretrainedOption = flag_option(FLAGS_BY_PARAM["pretrained"])
WeightsOption = flag_option(FLAGS_BY_PARAM["weights"])
FreezeOption = flag_option(FLAGS_BY_PARAM["freeze_epochs"])
BatchOption = flag_option(FLAGS_BY_PARAM["batch_size"])
SubsetOption = flag_option(FLAGS_BY_PARAM["subset"])
ImgSizeOption = flag_option(FLAGS_BY_PARAM["img_size"])
DeviceOption = flag_option(FLAGS_BY_PARAM["device"])
GroupsOption = flag_option(FLAGS_BY_PARAM["groups"])
GroupsCsvOption = flag_option(FLAGS_BY_PARAM["groups_csv"])
ExcludeOption = flag_option(FLAGS_BY_PARAM["exclude"])
TTAOption = Annotated[
    bool, typer.Option("--tta", help="average with the mirrored image (models trained with flips only)")
]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML config; flags override it")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="any config key, e.g. --set train.warmup_epochs=2")]


def training_options(*, without: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command every flag of the table (but `without`'s parameters) as options, and pass their values to it
    as one keyword, `options` ({config key: value or None}). `train` takes them all, `tune` all but --calibrate.

    Example:
        >>> app = typer.Typer()
        >>> @app.command()
        ... @training_options(without=("calibrate",))
        ... def tune(data: Path, *, options: dict[str, Any]) -> None: ...
        >>> [name in inspect.signature(tune).parameters for name in ("data", "lr", "calibrate", "options")]
        [True, True, False, False]
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command, eval_str=True)  # typer reads the wrapper's signature as it is
        flags = [flag for flag in FLAGS if flag.param not in without and flag.param not in own.parameters]
        kept = [param for name, param in own.parameters.items() if name != "options"]
        added = [
            inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=flag_option(flag))
            for flag in flags
        ]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            options = {flag.key: kwargs.pop(flag.param, None) for flag in flags}
            return command(*args, **kwargs, options=options)

        wrapper.__signature__ = own.replace(parameters=kept + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {param.name: param.annotation for param in kept + added}
        return wrapper

    return decorate


def run_config_from(config_file: Path | None, flags: dict[str, Any], assignments: list[str] | None):
    """Defaults < YAML file < flags < --set assignments."""
    from imgclf.config import build_config, load_config, parse_assignments

    overrides = {**flags, **parse_assignments(assignments or [])}
    return load_config(config_file, overrides) if config_file else build_config(None, overrides)


def settings_from(config_file: Path | None, flags: dict[str, Any], assignments: list[str] | None) -> dict[str, Any]:
    """The settings given, as dotted keys (YAML file < flags < --set assignments; flags not given left out): what
    `--resume` and `--reproduce` pass on, for the workflow to judge key by key."""
    from imgclf.config import parse_assignments, read_config_file

    in_file = _dotted(read_config_file(config_file)) if config_file else {}
    given = {key: value for key, value in flags.items() if value is not None}  # None: a flag not given
    return {**in_file, **given, **parse_assignments(assignments or [])}


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config file's tree as dotted overrides: `train: {epochs: 5}` -> `{"train.epochs": 5}`; a null is `NULL`
    (set to null, where None would mean "not given")."""
    from imgclf.config import NULL

    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = NULL if value is None else value
    return flat


# --- commands --------------------------------------------------------------------------------------------------
