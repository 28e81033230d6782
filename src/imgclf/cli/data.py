"""`imgclf split`, `init`, `inspect` and `preview`: the data, before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from imgclf.cli.app import app
from imgclf.cli.console import RichProgress, console, handles_errors, out_console
from imgclf.cli.options import (
    ExcludeOption,
    GroupsCsvOption,
    GroupsOption,
    ImgSizeOption,
    SubsetOption,
    examples,
    run_config_from,
)

__all__ = ["init", "inspect", "preview", "split"]


@app.command(
    epilog=examples(
        "imgclf split photos/ data/ --ratios 0.8 0.1 0.1 --seed 0",
        "imgclf split scans/ data/ --groups '(?P<group>patient\\d+)'   # each patient's images in one split",
    )
)
@handles_errors
def split(
    source: Annotated[Path, typer.Argument(help="source/<class>/ images")],
    target: Annotated[Path, typer.Argument(help="new folder for {train,val,test}/<class>/")],
    ratios: Annotated[tuple[float, float, float], typer.Option(help="train val test fractions")] = (
        0.8,
        0.1,
        0.1,
    ),
    seed: Annotated[int, typer.Option(help="same seed, same split")] = 0,
    copy: Annotated[bool, typer.Option("--copy", help="copy files instead of hard-linking")] = False,
    symlink: Annotated[bool, typer.Option("--symlink", help="symlink files instead of hard-linking")] = False,
    groups: GroupsOption = None,
    groups_csv: GroupsCsvOption = None,
    near_duplicates: Annotated[
        bool,
        typer.Option(
            "--near-duplicates/--no-near-duplicates", help="keep near-duplicates together (not just identical files)"
        ),
    ] = True,
) -> None:
    """Write a seeded, stratified train/val/test split of a class-folder dataset (source files untouched): identical
    files, near-duplicates and groups each stay in one split."""
    from imgclf import workflow

    if copy and symlink:
        raise typer.BadParameter("choose one of --copy and --symlink")
    mode = "copy" if copy else "symlink" if symlink else "hardlink"
    result = workflow.split(
        source,
        target,
        ratios=ratios,
        seed=seed,
        mode=mode,
        near_duplicates=near_duplicates,
        groups=groups,
        groups_csv=groups_csv,
        progress=RichProgress(),
    )
    summary = ", ".join(f"{name} {count}" for name, count in result.counts.items())
    out_console.print(f"wrote {summary} images to [bold]{escape(str(result.target))}[/] ({mode})")
    if result.near_duplicates:
        out_console.print(f"{result.near_duplicates} near-duplicate pair(s) kept in one split each")
    if result.problems:
        console.print(f"[yellow]{len(result.problems)} file(s) skipped:[/]")
        for problem in result.problems:
            console.print(f"  {escape(str(problem.path))}: {escape(problem.reason)}")


@app.command(
    epilog=examples(
        "imgclf init lab --from photos/                 # photos/<class>/*.jpg split into lab/data/",
        "imgclf init lab --from photos/ --ratios 0.7 0.15 0.15 --copy",
        "imgclf init lab                                # the layout only; put images in lab/data/train/<class>/",
    )
)
@handles_errors
def init(
    target: Annotated[Path, typer.Argument(help="the new project folder (must not exist, or be empty)")],
    from_: Annotated[
        Path | None, typer.Option("--from", help="a flat folder of class folders to split into data/")
    ] = None,
    ratios: Annotated[tuple[float, float, float], typer.Option(help="train val test fractions")] = (0.8, 0.1, 0.1),
    seed: Annotated[int, typer.Option(help="same seed, same split")] = 0,
    copy: Annotated[bool, typer.Option("--copy", help="copy images instead of hard-linking")] = False,
    symlink: Annotated[bool, typer.Option("--symlink", help="symlink images instead of hard-linking")] = False,
    groups: GroupsOption = None,
    groups_csv: GroupsCsvOption = None,
) -> None:
    """Create a lab project: data/{train,val,test}/<class>/ (split from --from: seeded, stratified, identical
    images, near-duplicates and --groups kept together), notebooks/Lab10_image_classification.ipynb pointed at it,
    models/ for the runs, and a README with the next commands."""
    from imgclf.scaffold import init_project

    if copy and symlink:
        raise typer.BadParameter("choose one of --copy and --symlink")
    mode = "copy" if copy else "symlink" if symlink else "hardlink"
    project = init_project(
        target,
        source=from_,
        ratios=ratios,
        seed=seed,
        mode=mode,
        groups=groups,
        groups_csv=groups_csv,
        progress=RichProgress(),
    )
    made = ", ".join(f"{split} {count}" for split, count in project.counts.items()) or "no images yet"
    console.print(f"project [bold]{escape(str(project.root))}[/]: data/ ({made}), notebooks/, models/, README.md")
    out_console.print(f"next: cd {escape(str(project.root))} && imgclf train data --fast-dev-run --out models")


@app.command(
    epilog=examples(
        "imgclf inspect data/",
        "imgclf inspect photos/ --out checks/ --ratios 0.7 0.15 0.15 --seed 1",
        "imgclf inspect data/ --config recipe.yaml   # the split and pixel limit train --config recipe.yaml uses",
        "imgclf inspect data/ --strict && imgclf train data/",
        "imgclf inspect data/ --labels              # likely mislabelled images: label_issues.csv",
        "imgclf inspect scans/ --groups '(?P<group>patient\\d+)'   # groups that span the splits",
    )
)
@handles_errors
def inspect(
    data: Annotated[Path, typer.Argument(help="root/{train,val,test}/<class>/ or root/<class>/")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: inspect-<data folder name>)")] = None,
    ratios: Annotated[
        tuple[float, float, float] | None,
        typer.Option(help="train val test fractions, as train's data.split_ratios (default 0.8 0.1 0.1)"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="split seed, as train's data.split_seed (default 0)")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="train's YAML config: its data.split_ratios, split_seed, max_pixels")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 when train would refuse the data")] = False,
    subset: SubsetOption = None,
    labels: Annotated[
        bool,
        typer.Option(
            "--labels", help="also look for likely mislabelled images (confident learning): label_issues.csv/.png"
        ),
    ] = False,
    groups: GroupsOption = None,
    groups_csv: GroupsCsvOption = None,
    exclude: ExcludeOption = None,
    near_duplicates: Annotated[
        bool, typer.Option("--near-duplicates/--no-near-duplicates", help="look for near-duplicates too")
    ] = True,
) -> None:
    """Dataset statistics, every problem train would stop or warn at, skipped files, duplicates and leaks, and a
    sample grid per class, for the split train would make; changes nothing. Exits 0 whatever it finds in the
    data (with --strict: 1 when train would refuse it); 1 when the folder does not exist or --out cannot be
    written, 2 for an invalid --config or --ratios."""
    from imgclf.explore import inspect_data

    flags = {
        "data.split_ratios": list(ratios) if ratios else None,
        "data.split_seed": seed,
        "data.subset": subset,
        "data.groups": groups,
        "data.groups_csv": groups_csv,
        "data.exclude": exclude,
        "data.near_duplicates": None if near_duplicates else False,
    }
    data_config = run_config_from(config, flags, None).data
    result = inspect_data(
        data,
        out=out,
        ratios=data_config.split_ratios,
        seed=data_config.split_seed,
        max_pixels=data_config.max_pixels,
        subset=data_config.subset,
        near_duplicates=data_config.near_duplicates,
        groups=data_config.groups,
        groups_csv=data_config.groups_csv,
        exclude=data_config.exclude,
        labels=labels,
        cache_dir=data_config.cache_dir,
        progress=RichProgress(),
    )
    summary = result.summary
    splits = [split for split, counts in summary["counts"].items() if counts]
    found = sorted({name for split in splits for name in summary["counts"][split]} - set(summary["classes"]))
    table = Table("class", *splits)
    for name in [*summary["classes"], *found]:  # val/test-only classes last: train would refuse them
        table.add_row(escape(name), *[str(summary["counts"][split].get(name, 0)) for split in splits])
    if splits:
        out_console.print(table)
    width, height = summary["width"], summary["height"]
    lines = [
        f"{summary['images']} images in {len(summary['classes'])} classes ({summary['layout']} layout)",
        f"imbalance ratio (largest / smallest training class): {summary['imbalance_ratio']}",
        f"size: width {width['min']}-{width['max']} (median {width['median']}), height {height['min']}-"
        f"{height['max']} (median {height['median']}); grayscale {summary['grayscale_fraction']:.0%}"
        if width
        else "no images",
        f"skipped files: {summary['skipped_files']}; leaks across splits: "
        f"{summary['duplicates']['leaks_across_splits']} identical, "
        f"{summary['duplicates']['near_leaks_across_splits']} near-duplicates; label conflicts: "
        f"{summary['duplicates']['label_conflicts']}",
    ]
    if summary["groups"]["rule"]:
        lines.append(
            f"groups: {summary['groups']['groups']} ({summary['groups']['images_in_groups']} images); spanning "
            f"splits: {len(summary['groups']['spanning_splits'])}"
        )
    if "label_issues" in summary:
        found = summary["label_issues"]
        lines.append(
            f"label issues: {found['skipped']}"
            if found["skipped"]
            else f"likely mislabelled: {found['flagged']} of {found['images']} images (label_issues.csv, "
            f"label_issues.png; out-of-fold accuracy {found['out_of_fold_accuracy']})"
        )
    for line in lines:
        out_console.print(escape(line))
    for message in summary["errors"]:
        out_console.print(f"[bold red]error:[/] {escape(message)}")
    for message in summary["warnings"]:
        out_console.print(f"[yellow]warning:[/] {escape(message)}")
    verdict = (
        f"train would stop: {len(summary['errors'])} error(s)" if summary["errors"] else "train would accept this data"
    )
    out_console.print(f"{verdict}; details and samples.png in [bold]{escape(str(result.out_dir))}[/]")
    if strict and summary["errors"]:
        raise typer.Exit(1)


@app.command(
    epilog=examples(
        "imgclf preview data/ --augment strong",
        "imgclf preview data/ --augment light --no-hflip --out light.png",
    )
)
@handles_errors
def preview(
    data: Annotated[Path, typer.Argument(help="the dataset (its train/ part is used when split)")],
    augment: Annotated[str, typer.Option(help="auto | none | light | standard | strong")] = "auto",
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip", help="random horizontal flips")] = True,
    vflip: Annotated[bool, typer.Option("--vflip/--no-vflip", help="random vertical flips")] = False,
    img_size: ImgSizeOption = None,
    images: Annotated[int, typer.Option(min=1, help="how many images (rows)")] = 4,
    versions: Annotated[int, typer.Option(min=1, help="augmented versions per image")] = 7,
    seed: Annotated[int, typer.Option(help="picks the images and the random draws")] = 0,
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("preview.png"),
) -> None:
    """A grid of training images next to augmented versions of them, as training will see them."""
    from imgclf.config import build_config
    from imgclf.explore import preview_augmentation

    build_config(None, {"augment.preset": augment})  # validates the name with the config's error message
    path = preview_augmentation(
        data,
        out=out,
        preset=augment,
        hflip=hflip,
        vflip=vflip,
        img_size=img_size,
        images=images,
        versions=versions,
        seed=seed,
    )
    out_console.print(f"preview: [bold]{escape(str(path))}[/]")
