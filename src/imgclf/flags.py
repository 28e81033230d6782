"""The one table of command-line flags that set configuration keys: each flag's config key, spelling, type, help
and `--help` panel. `train` and `tune` take their shared options from it (`cli.options.training_options`), the
CLI translates the config keys that messages below it name into these spellings, and the diagnosis's advice
spells its flags from it. Nothing here imports typer, so every layer may read the table.

Example:
    >>> flag_for("train.lr"), flag_for("train.warmup_epochs")
    ('--lr', '--set train.warmup_epochs')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FLAGS", "PANELS", "Flag", "flag_for", "flags_by_param", "keys_to_flags"]

PANELS = ("Model", "Training", "Data", "Augmentation", "Compute", "Tracking")


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key."""

    key: str  # the config key, e.g. "train.lr"
    param: str  # the command function's parameter, e.g. "lr" ("compile_" where the name is taken)
    type: Any  # the value's Python type (None = not given)
    help: str
    panel: str
    switch: str | None = None  # a boolean's spelling: "--hflip/--no-hflip" or "--ema" (on only)
    min: int | None = None

    @property
    def spelling(self) -> str:
        """The flag as typed: `--batch-size`, `--hflip` (the on form of a switch)."""
        return (self.switch or "--" + self.param.rstrip("_").replace("_", "-")).split("/")[0]


FLAGS: tuple[Flag, ...] = (
    # Model
    Flag("model.name", "model", str, "small_cnn or a timm model name (imgclf models)", "Model"),
    Flag(
        "model.pretrained",
        "pretrained",
        bool,
        "start from pretrained weights (new head)",
        "Model",
        switch="--pretrained/--no-pretrained",
    ),
    Flag("model.weights", "weights", Path, "pretrained weights file (.safetensors, .pth)", "Model"),
    Flag("train.freeze_epochs", "freeze_epochs", int, "epochs training only the head, backbone frozen", "Model"),
    Flag("train.unfreeze", "unfreeze", str, "after freezing: all, or the last K stages", "Model"),
    Flag("train.finetune_lr", "finetune_lr", float, "LR after unfreezing (default lr/10)", "Model"),
    Flag("train.layer_decay", "layer_decay", float, "per-layer LR factor below the head, e.g. 0.75", "Model"),
    # Training
    Flag("train.epochs", "epochs", int, "maximum epochs (of every trial, under tune)", "Training"),
    Flag(
        "train.time_budget",
        "time",
        str,
        "train for this long (90s, 10m, 2h), the LR schedule fitted to it; --epochs: a cap",
        "Training",
    ),
    Flag(
        "train.ema",
        "ema",
        bool,
        "also average the weights (EMA); ship whichever validates better",
        "Training",
        switch="--ema",
    ),
    Flag("train.batch_size", "batch_size", int, "images per step", "Training"),
    Flag("train.lr", "lr", str, "peak learning rate, or auto (LR finder)", "Training"),
    Flag("train.optimizer", "optimizer", str, "adamw | adam | sgd", "Training"),
    Flag("train.scheduler", "scheduler", str, "cosine | step | plateau | none", "Training"),
    Flag("train.weight_decay", "weight_decay", float, "weight decay", "Training"),
    Flag("train.label_smoothing", "label_smoothing", float, "label smoothing", "Training"),
    Flag("train.early_stopping.patience", "patience", int, "early-stopping patience in epochs", "Training"),
    Flag("train.class_weights", "class_weights", str, "none | auto (inverse frequency)", "Training"),
    Flag("train.seed", "seed", int, "training seed (of every trial, under tune)", "Training"),
    Flag(
        "train.calibrate",
        "calibrate",
        bool,
        "fit a temperature on val so probabilities match accuracy",
        "Training",
        switch="--calibrate",
    ),
    # Data
    Flag(
        "data.img_size",
        "img_size",
        int,
        "training resolution (default: pretrained model's, else the data's)",
        "Data",
    ),
    Flag(
        "data.subset",
        "subset",
        int,
        "start small: N images per class and split (seeded; the rest are not decoded)",
        "Data",
        min=1,
    ),
    Flag("data.color", "color", str, "auto | rgb | gray", "Data"),
    Flag(
        "data.groups",
        "groups",
        str,
        "regex over each image's relative path naming its group, e.g. '(?P<group>patient\\d+)': a group never "
        "spans two splits",
        "Data",
    ),
    Flag("data.groups_csv", "groups_csv", Path, "CSV of path, group: groups listed (see --groups)", "Data"),
    Flag(
        "data.exclude",
        "exclude",
        Path,
        "images to leave out: a CSV with a path column (an edited label_issues.csv) or one path per line",
        "Data",
    ),
    # Augmentation
    Flag("augment.preset", "augment", str, "none | light | standard | strong", "Augmentation"),
    Flag("augment.hflip", "hflip", bool, "random horizontal flips", "Augmentation", switch="--hflip/--no-hflip"),
    # Compute
    Flag("train.device", "device", str, "auto | cpu | cuda | cuda:N | mps", "Compute"),
    Flag("data.num_workers", "workers", int, "DataLoader workers (default: auto)", "Compute"),
    Flag("data.cache", "cache", str, "decoded-image cache: auto | memory | disk | off (default: auto)", "Compute"),
    Flag(
        "data.cache_dir",
        "cache_dir",
        Path,
        "where disk caches live (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)",
        "Compute",
    ),
    Flag(
        "train.precision",
        "precision",
        str,
        "auto | fp32 | bf16 | fp16 (auto: bf16/fp16 where the hardware has it)",
        "Compute",
    ),
    Flag(
        "train.compile",
        "compile_",
        bool,
        "torch.compile the model (faster on GPUs, not on CPUs)",
        "Compute",
        switch="--compile",
    ),
    Flag(
        "train.deterministic",
        "deterministic",
        bool,
        "deterministic kernels (repeatable GPU runs, slower)",
        "Compute",
        switch="--deterministic",
    ),
    # Tracking
    Flag(
        "tracking.mlflow",
        "mlflow",
        bool,
        "also log to MLflow ($MLFLOW_TRACKING_URI; imgclf[tracking]); under tune every trial",
        "Tracking",
        switch="--mlflow",
    ),
    Flag(
        "tracking.tensorboard",
        "tensorboard",
        bool,
        "TensorBoard event files in the run folder (imgclf[tracking])",
        "Tracking",
        switch="--tensorboard",
    ),
)

_BY_KEY = {flag.key: flag for flag in FLAGS}
_BY_PARAM = {flag.param: flag for flag in FLAGS}


def flag_for(key: str) -> str:
    """The spelling that sets a config key on the command line: its flag, or `--set key` for keys without one."""
    flag = _BY_KEY.get(key)
    return flag.spelling if flag is not None else f"--set {key}"


def flags_by_param() -> dict[str, Flag]:
    """{command parameter name: Flag}."""
    return dict(_BY_PARAM)


_KEY = re.compile(r"(?<![\w.-])((?:data|augment|model|train|tracking)\.[a-z_]+(?:\.[a-z_]+)?)(?![\w.])")


_SUGGESTED = re.compile(r"did you mean (?:[\w.]+(?:,\s*|\s+or\s+))*$")  # inside a "did you mean A, B or C" list


def keys_to_flags(message: str) -> str:
    """A message that names config keys (as the layers below the CLI do) with each key that has a flag written as
    that flag: "train.lr would change the run" -> "--lr would change the run". Keys without a flag, keys in an
    assignment (`--set train.lr=0.1`, `train.lr: 0.1`), quoted keys and suggested keys ("did you mean train.lr?",
    which a YAML file or --set needs) stay as they are.

    Example:
        >>> keys_to_flags("train.lr, model.name would make it another run; did you mean train.epochs?")
        '--lr, --model would make it another run; did you mean train.epochs?'
        >>> keys_to_flags("unknown key train.calibrat: did you mean train.calibrate or train.lr? train.lr is 0.1")
        'unknown key train.calibrat: did you mean train.calibrate or train.lr? --lr is 0.1'
    """

    def spell(match: re.Match[str]) -> str:
        key = match.group(1)
        before, after = message[: match.start()], message[match.end() :].lstrip(" ")[:1]
        if (
            key not in _BY_KEY
            or after in ("=", ":", "'")
            or before.endswith(("--set ", "'"))
            or _SUGGESTED.search(before)
        ):
            return key  # a key as a key: assigned, quoted, or suggested for a YAML file or --set
        return _BY_KEY[key].spelling

    return _KEY.sub(spell, message)
