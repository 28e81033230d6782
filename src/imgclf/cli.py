"""`imgclf` command line: each command parses its flags, builds a config, calls `imgclf.workflow`, and maps
errors to exit codes (0 ok, 1 failure, 2 usage error, 130 interrupted).

Heavy modules (torch, the workflow) are imported inside the commands, so `imgclf --help` answers at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from imgclf.errors import ImgclfError
from imgclf.progress import Progress, Task

app = typer.Typer(
    name="imgclf",
    help="From a folder of labelled images to a trained, evaluated image classifier.\n\n"
    "Start with `imgclf demo`, then `imgclf train data/`.",
    no_args_is_help=False,  # `imgclf` alone prints GETTING_STARTED (see _options)
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
UNWRAPPED_WIDTH = 100_000  # tables take only the width they need, so this is a "never wrap", not a padding


def _console(*, stderr: bool) -> Console:
    """Rich output that fits a terminal; anywhere else (CI, nohup, `| tee`, a file) lines are never wrapped, so a
    path or model name in a log or a table copy-pastes whole. (Off a terminal rich would wrap at 80 columns.)"""
    terminal = Console(stderr=stderr)
    return terminal if terminal.is_terminal else Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED_WIDTH)


console = _console(stderr=True)  # logs, progress, errors
out_console = _console(stderr=False)  # results

PROGRESS_SECONDS = 30.0  # off a terminal: the longest silence between progress lines ($IMGCLF_PROGRESS_SECONDS)
PROGRESS_MIN_GAP = 2.0  # ... and the shortest gap between two lines that mark 10 % steps

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(command: F) -> F:
    """Turn imgclf errors into a one-line message and an exit code instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return command(*args, **kwargs)
        except ImgclfError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class RichProgress(Progress):
    """In a terminal, progress bars on stderr that disappear when their task ends (the log keeps a summary line).

    Anywhere else a bar would show nothing until the end, so each task writes plain lines instead (no cursor
    control): one at every 10 % of its work, no closer than PROGRESS_MIN_GAP seconds apart, one at least every
    $IMGCLF_PROGRESS_SECONDS (default 30; 0: at every update), and one when it ends.
    """

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if not console.is_interactive:
            every = _progress_seconds()
            plain = _PlainTask(description, total, every_s=every, min_gap_s=min(PROGRESS_MIN_GAP, every))
            try:
                yield plain
            except BaseException:
                plain.finish(stopped=True)
                raise
            plain.finish()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Bars(*columns, console=console, transient=True) as bar:
            task_id = bar.add_task(description, total=total, info="")
            yield _RichTask(bar, task_id)


class _RichTask:
    def __init__(self, bar: Any, task_id: Any) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, amount: int = 1, **fields: object) -> None:
        info = "  ".join(f"{key} {value}" for key, value in fields.items())
        self.bar.update(self.task_id, advance=amount, **({"info": info} if info else {}))


class _PlainTask:
    """One task's progress as lines: `epoch 2/10: 450/900 (50%), 0:01:12, 6.2/s, loss 0.4213`."""

    def __init__(self, description: str, total: int | None, *, every_s: float, min_gap_s: float) -> None:
        import time

        self.clock = time.monotonic
        self.description, self.total = description, total
        self.every_s, self.min_gap_s = every_s, min_gap_s
        self.started = self.last_line = self.clock()
        self.done, self.marks_shown, self.info = 0, 0, ""

    def advance(self, amount: int = 1, **fields: object) -> None:
        self.done += amount
        if fields:
            self.info = ", ".join(f"{key} {value}" for key, value in fields.items())
        now = self.clock()
        mark = self.done * 10 // self.total if self.total else 0  # tenths done; 10 (the end) is finish's line
        if now - self.last_line >= self.every_s or (
            self.marks_shown < mark < 10 and now - self.last_line >= self.min_gap_s
        ):
            self._line(now, "")
            self.marks_shown = mark

    def finish(self, *, stopped: bool = False) -> None:
        if self.done or self.total:
            self._line(self.clock(), "stopped at " if stopped or (self.total and self.done < self.total) else "done, ")

    def _line(self, now: float, prefix: str) -> None:
        elapsed = now - self.started
        count = f"{self.done}/{self.total} ({self.done / self.total:.0%})" if self.total else f"{self.done}"
        rate = f", {self.done / elapsed:.1f}/s" if elapsed > 0 and self.done else ""
        info = f", {self.info}" if self.info else ""
        console.out(f"{self.description}: {prefix}{count}, {_clock(elapsed)}{rate}{info}", highlight=False)
        self.last_line = now


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _progress_seconds() -> float:
    import os

    from imgclf.errors import ConfigError

    raw = os.environ.get("IMGCLF_PROGRESS_SECONDS", "").strip()
    try:
        seconds = float(raw) if raw else PROGRESS_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ConfigError(f"IMGCLF_PROGRESS_SECONDS must be a number of seconds >= 0; received '{raw}'")
    return seconds


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


def examples(*commands: str) -> str:
    """An epilog for `--help` listing example command lines."""
    return "\n\n".join(["Examples:", *commands])


# Options that several commands share.
ModelOption = Annotated[str | None, typer.Option("--model", help="small_cnn or a timm model name (imgclf models)")]
PretrainedOption = Annotated[
    bool | None, typer.Option("--pretrained/--no-pretrained", help="start from pretrained weights (new head)")
]
WeightsOption = Annotated[Path | None, typer.Option("--weights", help="pretrained weights file (.safetensors, .pth)")]
FreezeOption = Annotated[
    int | None, typer.Option("--freeze-epochs", help="epochs training only the head, backbone frozen")
]
BatchOption = Annotated[int | None, typer.Option("--batch-size", help="images per step")]
SubsetOption = Annotated[
    int | None,
    typer.Option(min=1, help="start small: N images per class and split (seeded; the rest are not decoded)"),
]
ImgSizeOption = Annotated[
    int | None, typer.Option("--img-size", help="training resolution (default: pretrained model's, else the data's)")
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")]
TTAOption = Annotated[
    bool, typer.Option("--tta", help="average with the mirrored image (models trained with flips only)")
]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML config; flags override it")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="any config key, e.g. --set train.warmup_epochs=2")]

# Options that train and tune share (tune takes every config flag of train but --calibrate).
TimeOption = Annotated[
    str | None,
    typer.Option(help="train for this long (90s, 10m, 2h), the LR schedule fitted to it; --epochs: a cap"),
]
EmaOption = Annotated[
    bool | None, typer.Option("--ema", help="also average the weights (EMA); ship whichever validates better")
]
LrOption = Annotated[str | None, typer.Option(help="peak learning rate, or auto (LR finder)")]
UnfreezeOption = Annotated[str | None, typer.Option(help="after freezing: all, or the last K stages")]
FinetuneLrOption = Annotated[float | None, typer.Option(help="LR after unfreezing (default lr/10)")]
LayerDecayOption = Annotated[float | None, typer.Option(help="per-layer LR factor below the head, e.g. 0.75")]
OptimizerOption = Annotated[str | None, typer.Option(help="adamw | adam | sgd")]
SchedulerOption = Annotated[str | None, typer.Option(help="cosine | step | plateau | none")]
WeightDecayOption = Annotated[float | None, typer.Option(help="weight decay")]
LabelSmoothingOption = Annotated[float | None, typer.Option(help="label smoothing")]
AugmentOption = Annotated[str | None, typer.Option(help="none | light | standard | strong")]
HflipOption = Annotated[bool | None, typer.Option("--hflip/--no-hflip", help="random horizontal flips")]
ColorOption = Annotated[str | None, typer.Option(help="auto | rgb | gray")]
PatienceOption = Annotated[int | None, typer.Option(help="early-stopping patience in epochs")]
ClassWeightsOption = Annotated[str | None, typer.Option(help="none | auto (inverse frequency)")]
CacheDirOption = Annotated[
    Path | None, typer.Option(help="where disk caches live (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)")
]
PrecisionOption = Annotated[
    str | None, typer.Option(help="auto | fp32 | bf16 | fp16 (auto: bf16/fp16 where the hardware has it)")
]
CompileOption = Annotated[
    bool | None, typer.Option("--compile", help="torch.compile the model (faster on GPUs, not on CPUs)")
]
DeterministicOption = Annotated[
    bool | None, typer.Option("--deterministic", help="deterministic kernels (repeatable GPU runs, slower)")
]
GroupsOption = Annotated[
    str | None,
    typer.Option(
        "--groups",
        help="regex over each image's relative path naming its group, e.g. '(?P<group>patient\\d+)': a group never "
        "spans two splits",
    ),
]
GroupsCsvOption = Annotated[
    Path | None, typer.Option("--groups-csv", help="CSV of path, group: groups listed (see --groups)")
]
ExcludeOption = Annotated[
    Path | None,
    typer.Option(
        help="images to leave out: a CSV with a path column (an edited label_issues.csv) or one path per line"
    ),
]


# The config key behind each command-line flag (by the command function's parameter name); written once for every
# command that takes them (train, tune, lr-find).
FLAG_KEYS = {
    "model": "model.name",
    "pretrained": "model.pretrained",
    "weights": "model.weights",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "freeze_epochs": "train.freeze_epochs",
    "unfreeze": "train.unfreeze",
    "finetune_lr": "train.finetune_lr",
    "layer_decay": "train.layer_decay",
    "optimizer": "train.optimizer",
    "scheduler": "train.scheduler",
    "weight_decay": "train.weight_decay",
    "label_smoothing": "train.label_smoothing",
    "augment": "augment.preset",
    "hflip": "augment.hflip",
    "img_size": "data.img_size",
    "subset": "data.subset",
    "color": "data.color",
    "patience": "train.early_stopping.patience",
    "class_weights": "train.class_weights",
    "seed": "train.seed",
    "device": "train.device",
    "workers": "data.num_workers",
    "cache": "data.cache",
    "cache_dir": "data.cache_dir",
    "precision": "train.precision",
    "compile_": "train.compile",
    "deterministic": "train.deterministic",
    "calibrate": "train.calibrate",
    "mlflow": "tracking.mlflow",
    "tensorboard": "tracking.tensorboard",
    "time": "train.time_budget",
    "ema": "train.ema",
    "groups": "data.groups",
    "groups_csv": "data.groups_csv",
    "exclude": "data.exclude",
}


def config_flags(params: dict[str, Any]) -> dict[str, Any]:
    """{config key: value} for the flags among a command's parameters (None = not given)."""
    return {key: params[name] for name, key in FLAG_KEYS.items() if name in params}


def flag_name(key: str) -> str:
    """The flag of a config key (`train.lr` -> `--lr`), or `--set key` for keys without one."""
    for name, flag_key in FLAG_KEYS.items():
        if flag_key == key:
            return "--" + name.rstrip("_").replace("_", "-")
    return f"--set {key}"


def run_config_from(config_file: Path | None, flags: dict[str, Any], assignments: list[str] | None):
    """Defaults < YAML file < flags < --set assignments."""
    from imgclf.config import build_config, load_config, parse_assignments

    overrides = {**flags, **parse_assignments(assignments or [])}
    return load_config(config_file, overrides) if config_file else build_config(None, overrides)


# --- commands --------------------------------------------------------------------------------------------------


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
def train(
    data: Annotated[Path | None, typer.Argument(help="root/{train,val,test}/<class>/ or root/<class>/")] = None,
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    weights: WeightsOption = None,
    epochs: Annotated[int | None, typer.Option(help="maximum epochs")] = None,
    time: TimeOption = None,
    ema: EmaOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
    freeze_epochs: FreezeOption = None,
    unfreeze: UnfreezeOption = None,
    finetune_lr: FinetuneLrOption = None,
    layer_decay: LayerDecayOption = None,
    optimizer: OptimizerOption = None,
    scheduler: SchedulerOption = None,
    weight_decay: WeightDecayOption = None,
    label_smoothing: LabelSmoothingOption = None,
    augment: AugmentOption = None,
    hflip: HflipOption = None,
    img_size: ImgSizeOption = None,
    subset: SubsetOption = None,
    color: ColorOption = None,
    groups: GroupsOption = None,
    groups_csv: GroupsCsvOption = None,
    exclude: ExcludeOption = None,
    patience: PatienceOption = None,
    class_weights: ClassWeightsOption = None,
    seed: Annotated[int | None, typer.Option(help="training seed")] = None,
    device: DeviceOption = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: auto)")] = None,
    cache: Annotated[
        str | None, typer.Option(help="decoded-image cache: auto | memory | disk | off (default: auto)")
    ] = None,
    cache_dir: CacheDirOption = None,
    precision: PrecisionOption = None,
    compile_: CompileOption = None,
    deterministic: DeterministicOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="folder that receives the run folder")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="run folder name (default: <model>-<time>)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue runs/<name> from its last checkpoint")] = None,
    reproduce: Annotated[
        Path | None,
        typer.Option(help="train runs/<name> again: its config on the same files (checked against its manifest)"),
    ] = None,
    mlflow: Annotated[
        bool | None, typer.Option("--mlflow", help="also log to MLflow ($MLFLOW_TRACKING_URI; imgclf[tracking])")
    ] = None,
    tensorboard: Annotated[
        bool | None, typer.Option("--tensorboard", help="TensorBoard event files in the run folder (imgclf[tracking])")
    ] = None,
    calibrate: Annotated[
        bool | None, typer.Option("--calibrate", help="fit a temperature on val so probabilities match accuracy")
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
) -> None:
    """Train a classifier, keep the best epoch by validation, evaluate it on the test split and write the report.

    Under torchrun (`torchrun --nproc_per_node 8 -m imgclf train data/`) every process trains on its slice of the
    data with DistributedDataParallel and rank 0 writes the one run folder; --devices N starts torchrun itself."""
    from imgclf import workflow
    from imgclf.config import parse_assignments

    if devices is not None and devices > 1:
        _relaunch_under_torchrun(devices)
    flags = config_flags(locals())
    if time is not None and epochs is None:  # the budget decides the length; --epochs would cap it
        flags["train.epochs"] = BUDGET_EPOCHS
    if resume is not None and reproduce is not None:
        raise typer.BadParameter("choose one of --resume and --reproduce", param_hint="--reproduce")
    if reproduce is not None:
        settings = {**flags, **parse_assignments(set_ or [])}
        refused = [
            flag_name(key)
            for key, value in settings.items()
            if value is not None and key not in workflow.REPRODUCE_SETTINGS
        ]
        refused += [label for label, value in (("--config", config), ("--fast-dev-run", fast_dev_run)) if value]
        if refused:
            raise typer.BadParameter(
                f"--reproduce trains with {reproduce}'s own settings; {', '.join(refused)} would make it another run. "
                "These apply: " + ", ".join(sorted(flag_name(key) for key in workflow.REPRODUCE_SETTINGS)),
                param_hint="--reproduce",
            )
        result = workflow.reproduce(
            reproduce,
            data,
            out=None if out == Path("runs") else out,
            name=name,
            settings={key: value for key, value in settings.items() if key in workflow.REPRODUCE_SETTINGS},
            report=report,
            progress=RichProgress(),
        )
    elif resume is not None:
        given = [key for key, value in flags.items() if value is not None]
        refused = [flag_name(key) for key in given if key not in workflow.RESUME_SETTINGS]
        refused += [
            label
            for label, value in (
                ("DATA", data),
                ("--config", config),
                ("--name", name),
                ("--fast-dev-run", fast_dev_run),
            )
            if value
        ]
        settings = {key: value for key, value in flags.items() if key in workflow.RESUME_SETTINGS}
        for key, value in parse_assignments(set_ or []).items():
            if key not in workflow.RESUME_SETTINGS:
                refused.append(f"--set {key}")
            settings[key] = value
        if refused:
            raise typer.BadParameter(
                f"--resume continues {resume} with the settings it was trained with; {', '.join(refused)} would make "
                "it another run (start a new one for that). On resume these apply: "
                + ", ".join(sorted(flag_name(key) for key in workflow.RESUME_SETTINGS)),
                param_hint="--resume",
            )
        result = workflow.train(
            None, resume=resume, epochs=epochs, resume_settings=settings, report=report, progress=RichProgress()
        )
    else:
        run_config = run_config_from(config, flags, set_)
        result = workflow.train(
            data, run_config, out=out, name=name, report=report, fast_dev_run=fast_dev_run, progress=RichProgress()
        )
    if _rank() != 0:
        return
    if result.metrics:
        print_metrics(result.metrics)
    out_console.print(f"run folder: [bold]{escape(str(result.run_dir))}[/]")
    print_report(result.report)


BUDGET_EPOCHS = 1000  # train.epochs under --time without --epochs: a cap the budget reaches first


def _relaunch_under_torchrun(processes: int) -> None:
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
    for argument in sys.argv[1:]:
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
    model: ModelOption = None,
    pretrained: PretrainedOption = None,
    weights: WeightsOption = None,
    epochs: Annotated[int | None, typer.Option(help="maximum epochs per trial")] = None,
    batch_size: BatchOption = None,
    img_size: ImgSizeOption = None,
    subset: SubsetOption = None,
    freeze_epochs: FreezeOption = None,
    time: TimeOption = None,
    ema: EmaOption = None,
    lr: LrOption = None,
    unfreeze: UnfreezeOption = None,
    finetune_lr: FinetuneLrOption = None,
    layer_decay: LayerDecayOption = None,
    optimizer: OptimizerOption = None,
    scheduler: SchedulerOption = None,
    weight_decay: WeightDecayOption = None,
    label_smoothing: LabelSmoothingOption = None,
    augment: AugmentOption = None,
    hflip: HflipOption = None,
    color: ColorOption = None,
    groups: GroupsOption = None,
    groups_csv: GroupsCsvOption = None,
    exclude: ExcludeOption = None,
    patience: PatienceOption = None,
    class_weights: ClassWeightsOption = None,
    cache_dir: CacheDirOption = None,
    precision: PrecisionOption = None,
    compile_: CompileOption = None,
    deterministic: DeterministicOption = None,
    seed: Annotated[int | None, typer.Option(help="training seed of every trial")] = None,
    device: DeviceOption = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: auto)")] = None,
    cache: Annotated[str | None, typer.Option(help="decoded-image cache: auto | memory | disk | off")] = None,
    mlflow: Annotated[bool | None, typer.Option("--mlflow", help="log every trial to MLflow")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard", help="TensorBoard files per trial")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="folder that receives the study folder tune-<study>/")] = Path("runs"),
) -> None:
    """Search hyperparameters with Optuna (TPE, pruning on validation accuracy): every trial is a run folder under
    OUT/tune-STUDY/trials/, ranked by its kept epoch's validation accuracy; only the best is evaluated on test, once.
    An interrupted study resumes where it stopped; processes sharing --storage work on one study. Writes best.yaml,
    trials.csv, history.png, importance.png and summary.html."""
    from imgclf.config import parse_duration
    from imgclf.tune import tune as run_tune

    flags = config_flags(locals())
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
        params = ", ".join(f"{key} = {_cell(value, '{:.4g}')}" for key, value in result.best_params.items())
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
    epilog=examples(
        "imgclf evaluate runs/small_cnn-20261128-120000",
        "imgclf evaluate runs/small_cnn-20261128-120000 --data other/ --split test",
        "imgclf evaluate runs/small_cnn-20261128-120000 --tta",
        "imgclf evaluate runs/small_cnn-20261128-120000 --calibrate",
    )
)
@handles_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="runs/<name>")],
    data: Annotated[Path | None, typer.Option(help="evaluate on another labelled folder")] = None,
    split: Annotated[
        str | None, typer.Option(help="train | val | test of the run, or of --data (default test; a flat --data: all)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    out: Annotated[Path | None, typer.Option(help="folder for metrics.json etc.")] = None,
    tta: TTAOption = False,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="first fit a temperature on the run's val split (saved in model/)")
    ] = False,
    force_calibration: Annotated[
        bool,
        typer.Option(
            "--force-calibration", help="keep the temperature even if fitted on < 100 val images or raising val ECE"
        ),
    ] = False,
    ood: Annotated[
        bool,
        typer.Option("--ood", help="first choose the out-of-distribution threshold on the val split (saved in model/)"),
    ] = False,
) -> None:
    """Metrics of the run's best model on its test split (or another folder): accuracy, top-k, per-class
    precision/recall/F1, balanced accuracy, confusion matrix, predictions.csv (with each image's ood_score), and the
    share of images the model would answer 'unknown' for."""
    from imgclf import workflow

    result = workflow.evaluate(
        run,
        data=data,
        split=split,
        batch_size=batch_size,
        device=device,
        out=out,
        tta=tta,
        calibrate=calibrate,
        force_calibration=force_calibration,
        ood=ood,
        progress=RichProgress(),
    )
    print_metrics(result.metrics)
    out_console.print(f"written to [bold]{escape(str(result.out_dir))}[/]")


@app.command(
    epilog=examples(
        "imgclf predict runs/<name> photos/ --out preds.csv --top-k 3",
        "imgclf predict runs/<name>/model/model.onnx photos/ --out preds.csv   # ONNX Runtime, no torch",
        "imgclf predict runs/<name> 'inbox/**/*.jpg' --out preds.jsonl --format jsonl",
        "imgclf predict runs/<name> photos/ --tta",
        "imgclf predict runs/<name> photos/ --abstain --out preds.csv   # 'unknown' for images unlike training's",
        "torchrun --nproc_per_node 4 -m imgclf predict runs/<name> big/folder --out preds.csv   # sharded",
    )
)
@handles_errors
def predict(
    run: Annotated[Path, typer.Argument(help="runs/<name>, its model/ folder, or an exported .onnx file")],
    inputs: Annotated[list[str], typer.Argument(help="image files, folders (recursive) or glob patterns")],
    out: Annotated[
        Path | None, typer.Option(help="file to write, - for standard output (default: print a table)")
    ] = None,
    format_: Annotated[str, typer.Option("--format", help="csv | jsonl (for --out)")] = "csv",
    top_k: Annotated[int, typer.Option(min=1, help="classes per image")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps (PyTorch models)")] = "auto",
    tta: TTAOption = False,
    abstain: Annotated[
        bool,
        typer.Option(
            "--abstain", help="label images unlike the training data 'unknown' (the model's stored OOD threshold)"
        ),
    ] = False,
) -> None:
    """Predict images; unreadable files get a row with the error instead of stopping the run. Every row carries its
    ood_score (how unlike the training data the image is: the energy of the logits, higher = more unusual); with
    --abstain, images above the threshold chosen on validation are labelled 'unknown'. Exits 1 when no input could
    be read at all."""

    from imgclf import workflow

    to_stdout = out is not None and str(out) == "-"
    predictions = workflow.predict(
        run,
        inputs,
        top_k=top_k,
        batch_size=batch_size,
        device=device,
        tta=tta,
        abstain=abstain,
        out=None if to_stdout else out,
        out_format=format_,
        progress=RichProgress(),
    )
    failed = [p for p in predictions if p.error]
    if _rank() == 0:  # under torchrun, rank 0 wrote or shows every row
        _show_predictions(predictions, out=out, to_stdout=to_stdout, format_=format_, top_k=top_k)
    if failed and len(failed) == len(predictions):
        raise ImgclfError(f"none of the {len(predictions)} input(s) could be read; first: {failed[0].error}")
    if failed and _rank() == 0:
        console.print(f"[yellow]{len(failed)} file(s) could not be read; see the error column[/]")


def _show_predictions(predictions: list, *, out: Path | None, to_stdout: bool, format_: str, top_k: int) -> None:
    """Predictions on standard output (--out -), a line naming the file written, or a table."""
    import sys

    from imgclf.deploy.predict import predictions_text

    if to_stdout:
        sys.stdout.write(predictions_text(predictions, top_k=top_k, format=format_))
        sys.stdout.flush()
    elif out is not None:
        console.print(f"{len(predictions)} predictions written to [bold]{escape(str(out))}[/]")
    else:
        columns = [header for rank in range(1, top_k + 1) for header in (f"class {rank}", f"p {rank}")]
        table = Table("path", "label", *columns, "ood score", "error")
        for p in predictions:
            cells = []
            for rank in range(top_k):
                has = rank < len(p.classes)
                cells += [escape(p.classes[rank]) if has else "", f"{p.probabilities[rank]:.3f}" if has else ""]
            ood = "" if p.ood_score is None else f"{p.ood_score:.2f}"
            table.add_row(escape(p.source), escape(p.label or ""), *cells, ood, escape(p.error or ""))
        out_console.print(table)


@app.command(
    epilog=examples(
        "imgclf export runs/<name>                       # -> runs/<name>/model/model.onnx",
        "imgclf export runs/<name> --format torchscript  # -> model.ts",
        "imgclf export runs/<name> --format tflite       # -> model.tflite (pip install 'imgclf[tflite]')",
        "imgclf export runs/<name> --int8                # -> model.onnx and model.int8.onnx",
    )
)
@handles_errors
def export(
    run: Annotated[Path, typer.Argument(help="runs/<name> (its images check the export)")],
    format_: Annotated[str, typer.Option("--format", help="onnx | torchscript | tflite")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="file to write (default: runs/<name>/model/model.<ext>)")] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="also quantize to model.int8.onnx (ONNX Runtime; prints accuracy)")
    ] = False,
    int8_max_drop: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="most test accuracy int8 may lose (0.01 = 1 point)")
    ] = 0.01,
    tflite_batch: Annotated[int, typer.Option(min=1, help="the TFLite model's fixed batch size")] = 1,
) -> None:
    """Export the run's model and check it: eager PyTorch and the exported runtime must give the same top-1 class
    on up to 256 of the run's validation images, at batch 1 and 7 (TFLite: its --tflite-batch), with logits
    within a thousandth of the largest; otherwise nothing is written (exit 1). The figures go to model.json under
    `exports`."""
    from imgclf import workflow

    results = workflow.export(
        run,
        format=format_,
        out=out,
        int8=int8,
        tflite_batch=tflite_batch,
        max_accuracy_drop=int8_max_drop,
        progress=RichProgress(),
    )
    for result in results:
        check = result.check
        out_console.print(
            f"[bold]{escape(str(result.path))}[/] ({result.size_bytes / 1e6:.2f} MB, {result.format}): top-1 agreement "
            f"{check.top1_agreement:.4f}, max |Δlogit| {check.max_abs_logit_diff:.2e}"
            + (f" (tolerance {check.tolerance:.1e})" if check.tolerance is not None else "")
            + f" on {check.images} {check.split} images at batch {', '.join(map(str, check.batch_sizes))}"
        )
        if result.quantization:
            q = result.quantization
            out_console.print(
                f"int8 ({escape(q['method'])}): {q['accuracy_split']} accuracy {q['fp32_accuracy']:.4f} -> "
                f"{q['int8_accuracy']:.4f}; size {q['fp32_bytes'] / 1e6:.2f} MB -> {q['int8_bytes'] / 1e6:.2f} MB"
            )


@app.command(
    epilog=examples(
        "imgclf serve runs/<name> --port 8000                  # then open http://127.0.0.1:8000/",
        "imgclf serve runs/<name>/model/model.onnx --threads 2  # ONNX Runtime",
        "curl -F files=@cat.jpg -F files=@dog.png 'http://127.0.0.1:8000/predict?top_k=3'",
    )
)
@handles_errors
def serve(
    model: Annotated[Path, typer.Argument(help="runs/<name>, its model/ folder, or an exported .onnx file")],
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8000,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps (PyTorch models)")] = "auto",
    threads: Annotated[
        int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads (default: all cores)")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="images per forward pass when batching")] = 32,
    max_delay_ms: Annotated[float, typer.Option(min=0, help="wait this long for more requests to batch")] = 5.0,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="group concurrent requests")] = True,
    queue_size: Annotated[int, typer.Option(min=1, help="requests waiting for the model before 503")] = 64,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="largest request body (413 above)")] = 20.0,
    max_files: Annotated[int, typer.Option(min=1, help="files per request (413 above)")] = 16,
    max_pixels: Annotated[int | None, typer.Option(min=1, help="pixels per image (default: the run's)")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds per request (504 after)")] = 30.0,
    top_k: Annotated[int, typer.Option(min=1, help="classes per image unless ?top_k= says")] = 5,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="log every request")] = True,
) -> None:
    """Serve the model over HTTP (FastAPI + uvicorn): POST /predict, GET /health, /ready, /metadata, OpenAPI at
    /docs, and at / a page to drop images on. A model that cannot be loaded stops here, before listening."""
    import uvicorn

    from imgclf import workflow
    from imgclf.deploy.serve import ServeSettings

    settings = ServeSettings(
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        batching=batching,
        queue_size=queue_size,
        max_body_bytes=int(max_body_mb * 2**20),
        max_files=max_files,
        timeout_s=timeout,
        top_k=top_k,
        **({"max_pixels": max_pixels} if max_pixels else {}),
    )
    application = workflow.serve_app(model, settings, device=device, threads=threads)
    console.print(f"serving {escape(str(model))} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=access_log, timeout_graceful_shutdown=5)


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


runs_app = typer.Typer(
    help="The runs in a folder as a table (status, model, data, epochs, validation and test accuracy, minutes), or "
    "several runs compared (`imgclf runs compare A B`).",
    epilog=examples(
        "imgclf runs                          # the runs in runs/, oldest first",
        "imgclf runs --sort test_acc          # best test accuracy first (any column or test metric)",
        "imgclf runs --dir models --json      # for scripts",
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
            _cell(run["best_val_acc"]),
            _cell(run["test_acc"]),
            _cell(run["minutes"], "{:.1f}"),
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
        table.add_row(label, *[_cell(value, "{:.4g}") for value in values])
    out_console.print(table)
    if comparison.differing:
        differences = Table("differs", *[escape(name) for name in comparison.names])
        for key, values in comparison.differing.items():
            differences.add_row(key, *[escape(_cell(value, "{:.4g}")) for value in values])
        out_console.print(differences)
    else:
        out_console.print("the runs have the same configuration")
    out_console.print(f"written: [bold]{escape(str(comparison.html))}[/] and {escape(str(comparison.png))}")


def _cell(value: Any, form: str = "{:.4f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return form.format(value)
    return str(value)


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
            _size(entry.size_bytes),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)),
            escape(entry.source or "-"),
        )
    out_console.print(table)
    total = sum(entry.size_bytes for entry in entries)
    out_console.print(f"{len(entries)} cache(s), {_size(total)} in {escape(str(folder))}")


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
    out_console.print(f"deleted {len(deleted)} cache(s), {_size(freed)}, from {escape(str(folder))}")


def _size(size_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


# --- output ------------------------------------------------------------------------------------------------------


def print_report(report: Any) -> None:
    """The diagnosis in one line per verdict, and where the report is."""
    if report is None:
        return
    for verdict in report.verdicts:
        out_console.print(f"diagnosis: [bold]{escape(verdict.title)}[/]")
    out_console.print(f"report: [bold]{escape(str(report.html))}[/] (open it in a browser; {report.markdown.name} too)")


def print_metrics(metrics: dict[str, Any]) -> None:
    """Headline metrics and the per-class table."""
    headline = Table(title=f"{metrics.get('split', 'test')} metrics ({metrics.get('n', '?')} images)")
    headline.add_column("metric")
    headline.add_column("value", justify="right")
    for key in (
        "accuracy",
        "balanced_accuracy",
        "top3_accuracy",
        "top5_accuracy",
        "macro_f1",
        "weighted_f1",
        "log_loss",
    ):
        if key in metrics:
            headline.add_row(key, f"{metrics[key]:.4f}")
    ood = metrics.get("ood")
    if ood:
        headline.add_row("answered (ood score <= threshold)", f"{ood['accepted']:.4f}")
        if ood.get("accuracy_accepted") is not None:
            headline.add_row("accuracy of the answered", f"{ood['accuracy_accepted']:.4f}")
    out_console.print(headline)
    per_class = Table("class", "precision", "recall", "f1", "support")
    for name, row in metrics.get("per_class", {}).items():
        per_class.add_row(
            escape(name),
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        )
    out_console.print(per_class)


class _PlainLogHandler(logging.Handler):
    """Log records as plain lines, `WARNING  message`, never wrapped: for stderr that is not a terminal, where
    RichHandler would wrap at 80 columns and pad every line to that width."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.out(f"{record.levelname:<8} {self.format(record)}", highlight=False)
        except Exception:  # logging's contract: a broken stream must not break the program
            self.handleError(record)


def _setup_logging() -> None:
    """Log imgclf's INFO messages to stderr (once per process): through rich in a terminal, as plain lines
    elsewhere. Under torchrun, rank 0 logs; the other processes only warn, each line marked with its rank."""
    package_logger = logging.getLogger("imgclf")
    if any(isinstance(handler, (RichHandler, _PlainLogHandler)) for handler in package_logger.handlers):
        return
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    else:
        handler = _PlainLogHandler()
    rank = _rank()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _rank() -> int:
    """This process's global rank under torchrun (0 for a single process): only rank 0 prints results."""
    import os

    return int(os.environ.get("RANK", "0"))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="imgclf")
