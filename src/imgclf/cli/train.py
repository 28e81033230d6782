"""`imgclf train`, `imgclf tune` and `imgclf lr-find`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from imgclf.cli.app import app, command_line
from imgclf.cli.console import RichProgress, console, handles_errors, out_console, rank
from imgclf.cli.options import (
    BatchOption,
    ConfigOption,
    DeviceOption,
    FreezeOption,
    ImgSizeOption,
    ModelOption,
    PretrainedOption,
    SetOption,
    SubsetOption,
    WeightsOption,
    config_flags,
    examples,
    run_config_from,
    settings_from,
    training_options,
)
from imgclf.cli.output import cell, print_metrics, print_report

__all__ = ["lr_find", "train", "tune"]


@app.command(
    epilog=examples(
        "imgclf train data/ --model small_cnn --epochs 20",
        "imgclf train data/ --model resnet18 --img-size 128 --augment strong",
        "imgclf train data/ --model tf_efficientnet_lite0 --pretrained --freeze-epochs 3 --epochs 15",
        "imgclf train data/ --model mobilenetv2_100 --weights ./mobilenetv2.safetensors --lr auto",
        "imgclf train data/ --config recipe.yaml --set train.warmup_epochs=2",
        "imgclf train data/ --device cuda --precision bf16 --compile --cache memory",
        "imgclf train --resume runs/small_cnn-20261128-120000 [--epochs 40]",
        "imgclf train --reproduce runs/small_cnn-20261128-120000   # same config, same files (checked)",
        "imgclf train data/ --time 10m --ema                # the schedule fitted to 10 minutes; EMA weights",
        "imgclf train data/ --mlflow --tensorboard",
        "torchrun --nproc_per_node 8 -m imgclf train data/ --model resnet50 --pretrained   # one process per GPU",
        "imgclf train data/ --devices 2                                                   # torchrun started for you",
    )
)
@handles_errors
@training_options()
def train(
    context: typer.Context,
    data: Annotated[Path | None, typer.Argument(help="root/{train,val,test}/<class>/ or root/<class>/")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="folder that receives the run folder (default: runs)")] = None,
    name: Annotated[str | None, typer.Option(help="run folder name (default: <model>-<time>)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue runs/<name> from its last checkpoint")] = None,
    reproduce: Annotated[
        Path | None,
        typer.Option(help="train runs/<name> again: its config on the same files (checked against its manifest)"),
    ] = None,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="write report.html and report.md at the end")
    ] = True,
    devices: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="train on N processes of this machine (one per GPU, or CPU processes): launches torchrun itself",
        ),
    ] = None,
    fast_dev_run: Annotated[
        bool,
        typer.Option(
            "--fast-dev-run",
            help="check the whole pipeline in seconds: 2 images per class and split, two batches, one epoch, "
            "evaluate, report, export; the run folder is fast-dev-run-... and not a real result",
        ),
    ] = False,
    *,
    options: dict[str, Any],
) -> None:
    """Train a classifier, keep the best epoch by validation, evaluate it on the test split and write the report.

    Under torchrun (`torchrun --nproc_per_node 8 -m imgclf train data/`) every process trains on its slice of the
    data with DistributedDataParallel and rank 0 writes the one run folder; --devices N starts torchrun itself."""
    from imgclf import workflow

    if devices is not None and devices > 1:
        _relaunch_under_torchrun(devices, command_line(context))
    if resume is not None and reproduce is not None:
        raise typer.BadParameter("choose one of --resume and --reproduce", param_hint="--reproduce")
    if reproduce is not None and fast_dev_run:
        raise typer.BadParameter(
            "--fast-dev-run checks the pipeline on a new run, not --reproduce", param_hint="--reproduce"
        )
    # --resume and --reproduce pass on what the user gave, the settings as config keys: the workflow decides what
    # a run made again may change, and its refusal names the keys, which `handles_errors` writes as their flags
    if reproduce is not None:
        result = workflow.reproduce(
            reproduce,
            data,
            out=out,  # None: beside the original run
            name=name,
            settings=settings_from(config, options, set_),
            report=report,
            progress=RichProgress(),
        )
    elif resume is not None:
        result = workflow.train(
            data,
            resume=resume,
            name=name,
            fast_dev_run=fast_dev_run,
            resume_settings=settings_from(config, options, set_),
            report=report,
            progress=RichProgress(),
        )
    else:
        run_config = run_config_from(config, options, set_)
        result = workflow.train(
            data,
            run_config,
            out=out or Path("runs"),
            name=name,
            report=report,
            fast_dev_run=fast_dev_run,
            progress=RichProgress(),
        )
    if rank() != 0:
        return
    if result.metrics:
        print_metrics(result.metrics)
    out_console.print(f"run folder: [bold]{escape(str(result.run_dir))}[/]")
    print_report(result.report)


def _relaunch_under_torchrun(processes: int, given: list[str]) -> None:
    """Run this same command under `torchrun --standalone --nproc_per_node N` (without --devices) and exit with its
    exit code; inside torchrun already, --devices is ignored (torchrun decided the processes)."""
    import os
    import subprocess
    import sys

    from imgclf.training.distributed import launched

    if launched():
        logging.getLogger("imgclf").warning("--devices is ignored under torchrun, which started the processes")
        return
    arguments, skip = [], False
    for argument in given:  # what this invocation was given, from a shell or from app([...])
        if skip:
            skip = False
        elif argument == "--devices":
            skip = True
        elif not argument.startswith("--devices="):
            arguments.append(argument)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "imgclf", *arguments]
    console.print(f"starting {processes} processes: {' '.join(command[2:])}", highlight=False)
    raise typer.Exit(subprocess.call(command, env=os.environ.copy()))


@app.command(
    epilog=examples(
        "imgclf tune data/ --trials 30 --timeout 2h --space space.yaml",
        "imgclf tune data/ --storage postgresql://user:pw@host/db --study fmnist --trials 100   # on many machines",
        "imgclf tune data/ --epochs 8 --set train.batch_size=32 --pruner halving",
        "imgclf train data/ --config runs/tune-data/best.yaml",
    )
)
@handles_errors
@training_options(without=("calibrate",))
def tune(
    data: Annotated[Path, typer.Argument(help="root/{train,val,test}/<class>/ or root/<class>/, as for train")],
    trials: Annotated[int, typer.Option(min=1, help="trials the study should finish, over every process")] = 20,
    timeout: Annotated[
        str | None, typer.Option(help="stop starting trials after this long: 90s, 30m, 2h (this process)")
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option(help="YAML search space: key: {type: float|int|categorical, low, high, log, choices}"),
    ] = None,
    study: Annotated[str | None, typer.Option(help="study name (default: the data folder's name)")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna RDB URL shared by many processes (default: SQLite in the study folder)")
    ] = None,
    pruner: Annotated[str, typer.Option(help="median | halving | none")] = "median",
    tune_seed: Annotated[int, typer.Option("--tune-seed", help="the sampler's seed")] = 0,
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="folder that receives the study folder tune-<study>/")] = Path("runs"),
    *,
    options: dict[str, Any],
) -> None:
    """Search hyperparameters with Optuna (TPE, pruning on validation accuracy): every trial is a run folder under
    OUT/tune-STUDY/trials/, ranked by its kept epoch's validation accuracy; only the best is evaluated on test, once.
    An interrupted study resumes where it stopped; processes sharing --storage work on one study. Writes best.yaml,
    trials.csv, history.png, importance.png and summary.html."""
    from imgclf.config import parse_duration
    from imgclf.tuning import tune as run_tune

    flags = options
    result = run_tune(
        data,
        run_config_from(config, flags, set_),
        space=space,
        trials=trials,
        timeout=parse_duration(timeout, "--timeout") if timeout else None,
        study=study,
        storage=storage,
        out=out,
        pruner=pruner,
        seed=tune_seed,
        progress=RichProgress(),
    )
    counts = ", ".join(f"{count} {state.lower()}" for state, count in result.counts.items())
    out_console.print(f"study [bold]{escape(result.study_name)}[/] ({escape(result.storage)}): {counts}")
    if result.best_value is not None:
        params = ", ".join(f"{key} = {cell(value, '{:.4g}')}" for key, value in result.best_params.items())
        out_console.print(f"best: val accuracy {result.best_value:.4f} with {escape(params)}")
        if result.best_run is not None:
            out_console.print(f"best run: [bold]{escape(str(result.best_run))}[/]")
    if result.test_metrics:
        print_metrics(result.test_metrics)
    out_console.print(
        f"summary: [bold]{escape(str(result.study_dir / 'summary.html'))}[/]; train with: imgclf train "
        f"{escape(str(data))} --config {escape(str(result.study_dir / 'best.yaml'))}"
    )


@app.command(
    "lr-find",
    epilog=examples(
        "imgclf lr-find data/ --model tf_efficientnet_lite0 --pretrained",
        "imgclf lr-find data/ --model small_cnn --out plots/",
    ),
)
@handles_errors
def lr_find(
    data: Annotated[Path, typer.Argument(help="the dataset, as for train")],
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    weights: WeightsOption = None,
    freeze_epochs: FreezeOption = None,
    batch_size: BatchOption = None,
    img_size: ImgSizeOption = None,
    subset: SubsetOption = None,
    device: DeviceOption = None,
    steps: Annotated[int, typer.Option(min=10, help="steps of the LR ramp")] = 100,
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="folder for lr_find.png and lr_find.csv")] = Path("."),
) -> None:
    """LR range test: train briefly with a growing learning rate, plot loss against LR, suggest one.

    The model is restored afterwards. Use the suggestion with --lr, or let train do it with --lr auto.
    """
    from imgclf import workflow

    flags = config_flags(locals())
    if freeze_epochs:  # freeze_epochs must stay below epochs, which lr-find does not use
        flags["train.epochs"] = freeze_epochs + 1
    result = workflow.lr_find(
        data, run_config_from(config, flags, set_), out=out, num_steps=steps, progress=RichProgress()
    )
    out_console.print(
        f"suggested learning rate: [bold]{result.suggestion:.2e}[/] ({result.method} of the smoothed loss; "
        f"{result.stopped})\nplot: {escape(str(out / 'lr_find.png'))}"
    )
