"""`imgclf models`, `demo`, `config` and `cache`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from imgclf.cli.app import app
from imgclf.cli.console import RichProgress, handles_errors, out_console
from imgclf.cli.options import (
    examples,
)
from imgclf.cli.output import print_metrics, print_report, size_text

__all__ = ["cache_app", "cache_clear", "cache_list", "config_command", "demo", "models"]


@app.command(
    epilog=examples("imgclf models 'resnet*'", "imgclf models --pretrained 'efficientnet*'"),
)
@handles_errors
def models(
    pattern: Annotated[str, typer.Argument(help="shell-style pattern over model names")] = "*",
    pretrained: Annotated[bool, typer.Option("--pretrained", help="only models with published weights")] = False,
    limit: Annotated[int, typer.Option(min=1, help="show at most this many")] = 50,
) -> None:
    """List model names (small_cnn and timm's), parameter counts, and where pretrained weights are available
    offline (an installed package or the local Hugging Face cache)."""
    from imgclf.models.registry import describe_model, model_names

    names = model_names(pattern, pretrained=pretrained)
    table = Table()
    table.add_column("model", overflow="fold")
    table.add_column("parameters", justify="right")
    table.add_column("input")
    table.add_column("pretrained weights offline", overflow="fold")
    with RichProgress().task("Reading model definitions", total=min(limit, len(names))) as task:
        for name in names[:limit]:
            info = describe_model(name)
            offline = ", ".join(info.offline) or "-"
            table.add_row(info.name, f"{info.parameters / 1e6:.2f} M", info.input_size, offline)
            task.advance()
    out_console.print(table)
    more = f" (showing {limit}; --limit N for more)" if len(names) > limit else ""
    out_console.print(f"{len(names)} model(s) match '{escape(pattern)}'{more}")


@app.command()
@handles_errors
def demo(
    out: Annotated[Path, typer.Option(help="folder that receives the run folder")] = Path("runs"),
    data_dir: Annotated[Path, typer.Option(help="where the digit images are written")] = Path("demo_data/digits"),
    epochs: Annotated[int | None, typer.Option(help="override the demo's epochs")] = None,
) -> None:
    """Write scikit-learn's handwritten digits as an image folder, train small_cnn, evaluate on test, write the
    report."""
    from imgclf import workflow
    from imgclf.config import build_config
    from imgclf.demo import DEMO_CONFIG, write_digits

    folder = write_digits(data_dir)
    run_config = build_config(DEMO_CONFIG, {"train.epochs": epochs})
    result = workflow.train(folder, run_config, out=out, progress=RichProgress())
    if result.metrics:
        print_metrics(result.metrics)
    out_console.print(f"data: {escape(str(folder))}\nrun folder: [bold]{escape(str(result.run_dir))}[/]")
    print_report(result.report)


@app.command("config")
@handles_errors
def config_command(
    file: Annotated[Path | None, typer.Argument(help="show this YAML file resolved against the defaults")] = None,
) -> None:
    """Print every configuration key with its default and meaning (YAML, usable with --config)."""
    from imgclf.config import RunConfig, dump_config, load_config

    resolved = load_config(file) if file else RunConfig()
    typer.echo(dump_config(resolved), nl=False)


cache_app = typer.Typer(
    help="List or clear the decoded-image cache (train's --cache disk/auto; $IMGCLF_CACHE_DIR or ~/.cache/imgclf).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")
CacheDirOption = Annotated[
    Path | None, typer.Option(help="the cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)")
]


@cache_app.command("list", epilog=examples("imgclf cache list", "imgclf cache list --cache-dir /scratch/cache"))
@handles_errors
def cache_list(cache_dir: CacheDirOption = None) -> None:
    """Every cache entry (decoded images, near-duplicate features, label-issue embeddings): what it holds, its size,
    when a run last used it, and the folder it was made from."""
    import time

    from imgclf.data.cache import default_cache_dir, list_cache

    folder = cache_dir or default_cache_dir()
    entries = list_cache(folder)
    if not entries:
        out_console.print(f"no caches in {escape(str(folder))}")
        return
    table = Table("cache", "holds", "images", "size", "last used")
    table.add_column("made from", overflow="fold")  # a path: folded in a terminal, whole elsewhere
    for entry in entries:
        if not entry.complete:
            images = "(unfinished build)"
        elif entry.side is None:
            images = str(entry.images)
        else:
            images = f"{entry.images} x {entry.side}px {entry.color}"
        table.add_row(
            escape(entry.key[:12]),
            escape(entry.kind),
            escape(images),
            size_text(entry.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)),
            escape(entry.source or "-"),
        )
    out_console.print(table)
    total = sum(entry.size_bytes for entry in entries)
    out_console.print(f"{len(entries)} cache(s), {size_text(total)} in {escape(str(folder))}")


@cache_app.command(
    "clear", epilog=examples("imgclf cache clear", "imgclf cache clear --older-than 30  # unused for a month")
)
@handles_errors
def cache_clear(
    older_than: Annotated[
        float | None, typer.Option(min=0, help="only caches no run has used for this many days")
    ] = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Delete decoded-image caches (all, or those unused for --older-than days); a run rebuilds what it needs.
    Only cache entries are deleted, never other files in the folder; one in use by another process is kept."""
    from imgclf.data.cache import clear_cache, default_cache_dir

    folder = cache_dir or default_cache_dir()
    deleted = clear_cache(folder, older_than_days=older_than)
    freed = sum(entry.size_bytes for entry in deleted)
    out_console.print(f"deleted {len(deleted)} cache(s), {size_text(freed)}, from {escape(str(folder))}")
