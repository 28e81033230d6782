"""`imgclf report` and `imgclf runs` (the table, `runs compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from imgclf.cli.app import app
from imgclf.cli.console import RichProgress, console, handles_errors, out_console
from imgclf.cli.options import (
    examples,
)
from imgclf.cli.output import cell, print_report

__all__ = ["report", "runs_app", "runs_compare", "runs_table"]


@app.command(
    epilog=examples(
        "imgclf report runs/small_cnn-20261128-120000",
    )
)
@handles_errors
def report(
    run: Annotated[Path, typer.Argument(help="runs/<name>")],
    device: Annotated[str, typer.Option(help="where Grad-CAM runs: auto | cpu | cuda | mps")] = "cpu",
) -> None:
    """Rebuild report.html (one self-contained file) and report.md from a run folder: diagnosis, learning curves,
    confusion matrix, per-class metrics, calibration, most confident mistakes with Grad-CAM, config."""
    from imgclf import workflow

    print_report(workflow.report(run, device=device, progress=RichProgress()))


class _RunsGroup(TyperGroup):
    """`imgclf runs`: a folder given where a subcommand would be (`imgclf runs models/`) is the folder to list, as
    with --dir; anything else is looked up as a subcommand (a typo still gets Click's "No such command")."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands and Path(args[0]).is_dir():
            args = ["--dir", args[0], *args[1:]]
        return super().parse_args(ctx, args)


runs_app = typer.Typer(
    cls=_RunsGroup,
    help="The runs in a folder as a table (status, model, data, epochs, validation and test accuracy, minutes), or "
    "several runs compared (`imgclf runs compare A B`).",
    epilog=examples(
        "imgclf runs                          # the runs in runs/, oldest first",
        "imgclf runs --sort test_acc          # best test accuracy first (any column or test metric)",
        "imgclf runs models/ --json           # another folder (or --dir models), for scripts",
        "imgclf runs runs/tune-fmnist         # a study: its trials",
        "imgclf runs compare runs/a runs/b    # config diff, metrics, curves -> compare.html, compare.png",
    ),
)
app.add_typer(runs_app, name="runs")


@runs_app.callback(invoke_without_command=True)
@handles_errors
def runs_table(
    context: typer.Context,
    dir_: Annotated[Path, typer.Option("--dir", help="the folder train wrote the runs into (its --out)")] = Path(
        "runs"
    ),
    sort: Annotated[str, typer.Option(help="a column or test metric; best first (default: oldest first)")] = "started",
    json_: Annotated[bool, typer.Option("--json", help="print the runs as JSON records, for scripts")] = False,
    all_: Annotated[bool, typer.Option("--all", help="also list fast dev runs")] = False,
) -> None:
    """List the runs in a folder: status (running, finished, stopped, failed, or crashed when a running run's
    process is gone), start, model, data fingerprint (equal for the same images and split), epochs, the kept epoch's
    validation accuracy, test accuracy and minutes. Reads the run folders only."""
    if context.invoked_subcommand is not None:
        return
    import json

    from imgclf.tracking.runs import list_runs, sort_runs

    summaries = list_runs(dir_, include_dev_runs=all_)
    if not summaries and (dir_ / "trials").is_dir():  # a study folder of imgclf tune: its runs are its trials
        console.print(f"{escape(str(dir_))} is a study folder: listing its trials ({escape(str(dir_ / 'trials'))})")
        dir_ = dir_ / "trials"
        summaries = list_runs(dir_, include_dev_runs=all_)
    if sort != "started":
        summaries = sort_runs(summaries, sort)
    if json_:
        typer.echo(json.dumps(summaries, indent=2, default=str))
        return
    if not summaries:
        out_console.print(f"no runs in {escape(str(dir_))} (imgclf train data/ --out {escape(str(dir_))})")
        return
    table = Table("run", "status", "started", "model", "data", "epochs", "best val acc", "test acc", "minutes")
    colours = {"finished": "green", "running": "cyan", "stopped": "yellow", "failed": "red", "crashed": "red"}
    for run in summaries:
        colour = colours.get(run["status"] or "", "white")
        planned = f"/{run['epochs_planned']}" if run["epochs_planned"] else ""
        table.add_row(
            escape(run["name"]),
            f"[{colour}]{escape(str(run['status']))}[/]",
            (run["started"] or "-")[:16].replace("T", " "),
            escape(str(run["model"] or "-")) + (" (pretrained)" if run["pretrained"] else ""),
            run["data"] or "-",
            f"{run['epochs']}{planned}",
            cell(run["best_val_acc"]),
            cell(run["test_acc"]),
            cell(run["minutes"], "{:.1f}"),
        )
    out_console.print(table)
    for run in summaries:
        if run["status"] in ("failed", "crashed", "stopped") and run["reason"]:
            console.print(f"[yellow]{escape(run['name'])}: {escape(run['status'])}:[/] {escape(str(run['reason']))}")


@runs_app.command("compare", epilog=examples("imgclf runs compare runs/a runs/b runs/c --out comparisons/"))
@handles_errors
def runs_compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run folders")],
    out: Annotated[Path, typer.Option(help="folder for compare.html and compare.png")] = Path("."),
) -> None:
    """Compare runs: the configuration keys that differ, their metrics side by side and their learning curves
    overlaid; writes compare.html (one self-contained page, differing keys highlighted) and compare.png."""
    from imgclf.tracking.compare import compare_runs

    comparison = compare_runs(runs, out)
    table = Table("", *[escape(name) for name in comparison.names])
    for label, values in comparison.rows:
        table.add_row(label, *[cell(value, "{:.4g}") for value in values])
    out_console.print(table)
    if comparison.differing:
        differences = Table("differs", *[escape(name) for name in comparison.names])
        for key, values in comparison.differing.items():
            differences.add_row(key, *[escape(cell(value, "{:.4g}")) for value in values])
        out_console.print(differences)
    else:
        out_console.print("the runs have the same configuration")
    out_console.print(f"written: [bold]{escape(str(comparison.html))}[/] and {escape(str(comparison.png))}")
