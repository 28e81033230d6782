"""The `imgclf` Typer app, its top-level options and the getting-started text; the commands register themselves
on it from the modules beside this one."""

from __future__ import annotations

from typing import Annotated

import click
import typer
from typer.core import TyperGroup

__all__ = ["ARGV", "GETTING_STARTED", "app", "command_line"]

ARGV = "imgclf.argv"  # the context meta key of the arguments this invocation was given


class _App(TyperGroup):
    """The root group, which keeps the arguments it was called with (`imgclf train data/ --devices 2` from a shell,
    or `app(["train", ...])` from Python, where sys.argv is the caller's), for a command that must start itself
    again (`--devices` under torchrun)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGV] = list(args)
        return super().parse_args(ctx, args)


def command_line(context: typer.Context) -> list[str]:
    """The arguments of the running `imgclf` invocation (after the program name), from a command's context."""
    return list(context.find_root().meta.get(ARGV, []))


app = typer.Typer(
    cls=_App,
    name="imgclf",
    help="From a folder of labelled images to a trained, evaluated image classifier.\n\n"
    "Start with `imgclf demo`, then `imgclf train data/`.",
    no_args_is_help=False,  # `imgclf` alone prints GETTING_STARTED (see _options)
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from imgclf import __version__  # imgclf's __init__ is lazy: no torch

        typer.echo(f"imgclf {__version__}")
        raise typer.Exit()


GETTING_STARTED = """imgclf: from a folder of labelled images to a trained, evaluated classifier you can ship.

Getting started:
  imgclf demo                              train on the embedded handwritten digits, see the report
  imgclf init lab --from photos/           a lab project: data/{train,val,test}/<class>/, a notebook, models/
  imgclf inspect data/                     look before you train: counts, sizes, problems, leaks
  imgclf train data/ --fast-dev-run        the whole pipeline on a sliver of the data, in seconds
  imgclf train data/ --subset 20           start small: 20 images per class and split
  imgclf train data/                       train; the report is runs/<name>/report.html
  imgclf export runs/latest                a checked ONNX model; then imgclf serve runs/latest

data/ holds one folder per class (data/<class>/*.jpg), or train/, val/ and test/ folders of them.
Every command has --help; `imgclf --help` lists them all. The guide: docs/guide.md."""


@app.callback(invoke_without_command=True)
def _options(
    context: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print imgclf's version and exit"),
    ] = False,
) -> None:
    """Options that come before the command (the app's help text is the Typer(help=...) above); `imgclf` alone
    prints a short getting-started text."""
    if context.invoked_subcommand is None:
        typer.echo(GETTING_STARTED)
