"""The one typed configuration of a run, grouped by concern: every field, its default and its meaning, documented
here and only here (`imgclf config` prints them; docs/config.md is generated from them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imgclf.config.text import parse_duration
from imgclf.errors import ConfigError

__all__ = [
    "BUDGET_EPOCHS",
    "MAX_LR",
    "MIN_STEPS_PER_EPOCH",
    "AugmentConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "ModelConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "auto_batch_size",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class DataConfig(_Section):
    """How images are found, split and decoded."""

    split_ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1),
        description="train/val/test fractions used when the folder is not split already (flat class folders)",
    )
    split_seed: int = Field(0, description="seed of that split; separate from train.seed so runs share a split")
    subset: int | None = Field(
        None,
        ge=1,
        description="start small: N images per class and split, drawn with split_seed (the rest are not even "
        "decoded; a flat folder's subset is shared out N per split); null = every image",
    )
    color: Literal["auto", "rgb", "gray"] = Field(
        "auto",
        description="channels fed to the model; auto = gray when every training image is single-channel, "
        "except for pretrained models, which get gray images replicated to RGB",
    )
    img_size: int | None = Field(
        None,
        ge=8,
        description="square training resolution; null = the pretrained model's, else from the data (median side "
        "rounded up to 4, in 28..224)",
    )
    crop_pct: float | None = Field(
        None,
        gt=0,
        le=1,
        description="eval: resize to img_size/crop_pct, then center-crop img_size; null = pretrained model's, else 1",
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="resampling filter; null = the pretrained model's, else bilinear"
    )
    mean: tuple[float, ...] | None = Field(
        None, description="per-channel normalisation mean; null = the pretrained model's, else ImageNet's"
    )
    std: tuple[float, ...] | None = Field(
        None, description="per-channel normalisation std; null = the pretrained model's, else ImageNet's"
    )
    max_pixels: int = Field(
        50_000_000, gt=0, description="images with more pixels are rejected (decompression-bomb guard)"
    )
    cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto",
        description="decode images once into a uint8 array and augment whole batches on the device: disk (reused "
        "across runs) | memory | off (decode every epoch) | auto = disk when it fits data.cache_budget",
    )
    cache_dir: Path | None = Field(
        None, description="where disk caches live; null = $IMGCLF_CACHE_DIR or ~/.cache/imgclf"
    )
    cache_budget: float = Field(
        0.25, gt=0, le=1, description="auto caches when the decoded images take at most this fraction of RAM"
    )
    near_duplicates: bool = Field(
        True,
        description="find near-duplicates (the same picture re-encoded, resized, slightly cropped or brightened: "
        "perceptual hash + aligned thumbnails), keep each cluster in one split and report those across splits "
        "(duplicates.csv); false = identical files only",
    )
    groups: str | None = Field(
        None,
        description="regular expression over each image's path relative to the data folder naming its group (one "
        "video, one patient), e.g. '(?P<group>patient\\d+)': a group never spans two splits; null = no groups",
    )
    groups_csv: Path | None = Field(
        None, description="a CSV of path, group (paths relative to the data folder): groups listed, as groups"
    )
    exclude: Path | None = Field(
        None,
        description="images to leave out: a CSV with a path column (an edited label_issues.csv) or one path per line; "
        "each is listed in problems.csv",
    )
    label_issues: bool | Literal["auto"] = Field(
        "auto",
        description="look for likely mislabelled images (confident learning on out-of-fold predictions from frozen "
        "pretrained features): label_issues.csv and a report gallery; auto = on for 500 to 10,000 images",
    )
    max_bad_images: int = Field(
        10,
        ge=0,
        description="images that fail to load during training are skipped; past this many the run stops (exit 1)",
    )
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes; null = auto (0 on machines with <= 2 cores)"
    )

    @field_validator("cache", mode="before")
    @classmethod
    def _off_is_a_word(cls, value: Any) -> Any:
        return "off" if value is False else value  # `cache: off` in YAML arrives as False

    @field_validator("groups")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            from imgclf.data.groups import compile_pattern

            try:
                compile_pattern(value)
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("data.groups ")) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std or ())):
            raise ValueError(
                f"mean and std must be given together, with one value per channel; received "
                f"mean={self.mean}, std={self.std}"
            )
        train, val, test = self.split_ratios
        if min(self.split_ratios) < 0 or train <= 0 or abs(train + val + test - 1.0) > 1e-6:
            raise ValueError(
                f"split_ratios must be three non-negative fractions (train > 0) that sum to 1; "
                f"received {list(self.split_ratios)}"
            )
        return self


def _at_least_or_auto(value: int | str, low: int) -> int | str:
    """A field's check for `int | "auto"`: the number at least `low` (the Literal has already checked the word)."""
    if isinstance(value, int) and value < low:
        raise ValueError(f"must be at least {low} or 'auto'; received {value}")
    return value


class AugmentConfig(_Section):
    """Training-time augmentation. Validation and test images only get resize + center crop + normalize."""

    preset: Literal["auto", "none", "light", "standard", "strong"] = Field(
        "auto",
        description="none | light (crop, flip) | standard (+ rotation, color jitter) | strong (+ TrivialAugment, "
        "random erasing, MixUp/CutMix) | auto = light for small images (<= 64 px), standard above",
    )
    hflip: bool = Field(True, description="random horizontal flips; switch off for orientation-sensitive data")
    vflip: bool = Field(False, description="random vertical flips (aerial, microscopy)")
    min_res: int | None = Field(
        None,
        ge=8,
        description="progressive resizing: early epochs train on images downscaled to this size, growing to "
        "img_size over res_ramp (cheaper epochs while the network learns coarse shapes); null = off",
    )
    res_ramp: tuple[float, float] = Field(
        (0.4, 0.75),
        description="fractions of the epochs between which the size grows from min_res to img_size (before: "
        "min_res, after: img_size)",
    )

    @model_validator(mode="after")
    def _check_ramp(self) -> AugmentConfig:
        start, end = self.res_ramp
        if not 0 <= start <= end <= 1:
            raise ValueError(f"res_ramp must be two fractions 0 <= start <= end <= 1; received {list(self.res_ramp)}")
        return self


class ModelConfig(_Section):
    """Which network to train."""

    name: str = Field("small_cnn", description="small_cnn or any timm model name (e.g. resnet18)")
    depth: int = Field(3, ge=3, le=5, description="small_cnn: number of conv blocks (each halves the resolution)")
    width: int | Literal["auto"] = Field(
        "auto",
        description="small_cnn: channels of the first block, doubled per block; auto = 32, or 64 where a time "
        "budget buys 30+ epochs of width 32 on 10,000+ training images (timed over a few steps before training; "
        "Fashion-MNIST, 20 minutes: 0.9464 against 0.9426), and with small_cnn weights their width; config.yaml "
        "records the choice",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier head")
    pool: int = Field(
        2,
        ge=1,
        le=4,
        description="small_cnn: average-pool the last feature map to pool x pool cells for the head (1 = global; "
        "2 keeps coarse position, for centred images)",
    )
    early_pool: bool | Literal["auto"] = Field(
        "auto",
        description="small_cnn: max-pool right after each block's first conv, so its second conv runs at half the "
        "resolution: half the FLOPs, ~1.8x the training speed, for ~0.3 points of accuracy at the same epochs "
        "(Fashion-MNIST, 12 epochs: 0.932-0.934 against 0.936) but more in the same time; auto = on where training "
        "computes in fp32 on a CPU (no native bf16), off on GPUs and bf16 CPUs; config.yaml records the choice",
    )
    pretrained: bool = Field(
        False,
        description="start from pretrained weights: an installed weights package, the Hugging Face cache, or the hub "
        "when online (imgclf models --pretrained lists them); the classifier head is always new",
    )
    weights: Path | None = Field(
        None, description="start from this weights file (safetensors, or a .pth/.bin state dict); implies pretrained"
    )
    whiten: bool | Literal["auto"] = Field(
        "auto",
        description="small_cnn: a frozen first layer that whitens 2x2 patches, fitted to 5,000 training images "
        "before training (airbench's first layer; Fashion-MNIST, 5 minutes: 0.9370 against 0.9327 without); auto = "
        "on from 10,000 training images, off below (the 1,617 digits: level), and with small_cnn weights whatever "
        "they were trained with; config.yaml records the choice",
    )

    @field_validator("width")
    @classmethod
    def _wide_enough(cls, value: int | str) -> int | str:
        return _at_least_or_auto(value, 4)


class EarlyStoppingConfig(_Section):
    """Stop when the monitored validation metric stops improving; the best weights are always kept."""

    patience: int | None = Field(10, ge=1, description="epochs without improvement before stopping; null = off")
    monitor: Literal["val_loss", "val_acc"] = Field("val_loss", description="validation metric that selects the model")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto = min for losses, max for accuracies")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")


# The largest learning rate accepted: float32's largest number (an LR beyond it overflows inside the optimizer with a
# raw error; any LR near it diverges, and the NaN guard says so).
MAX_LR = 3.4028234663852886e38

# An epoch of fewer optimizer steps changes the model a few times only: `batch_size: auto` avoids it, training
# warns about it, and the diagnosis waits for more (evaluation/diagnose.py).
MIN_STEPS_PER_EPOCH = 10


def auto_batch_size(train_images: int, largest: int = 64, smallest: int = 8) -> int:
    """`train.batch_size: auto`: 64, halved while an epoch would have fewer than 10 steps, never below 8.

    On 96 training images the fixed 64 gave one step per epoch and left 32 images out of every epoch; this
    gives 8 (12 steps). 160 images get 16, 320 get 32, 640 and more 64.

    Example:
        >>> [auto_batch_size(n) for n in (96, 160, 320, 640, 54000)]
        [8, 16, 32, 64, 64]
    """
    batch = largest
    while batch > smallest and train_images // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


BUDGET_EPOCHS = 1000  # train.epochs under a time budget when epochs is not given: a cap the budget reaches first


class TrainConfig(_Section):
    """Optimisation recipe. The defaults (12 epochs of AdamW at 2e-3, 1 warmup epoch then cosine, weight decay
    0.01, label smoothing 0.1, batch 64 (`auto`: smaller on small sets); with small_cnn's 2x2-pooled head, no
    dropout and the light preset for small images) reach 0.935-0.936 test accuracy on Fashion-MNIST in 16-20
    minutes on 2 AVX2 cores; with `model.early_pool` 0.932-0.934 in about 9 minutes (docs/benchmarks.md)."""

    epochs: int = Field(
        12,
        ge=1,
        description=f"maximum number of epochs (with time_budget an upper bound: the budget decides; not given, "
        f"{BUDGET_EPOCHS:,}, which the budget reaches first)",
    )
    time_budget: str | None = Field(
        None,
        description="train for this long (90s, 10m, 2h: training and validation, not the scan, cache build, test or "
        "report) with the LR schedule fitted to the steps that fit, re-planned as the run measures its speed; "
        "null = train.epochs decides",
    )
    ema: bool = Field(
        False,
        description="also keep an exponential moving average of the weights (timm's ModelEmaV3, BatchNorm statistics "
        "averaged too), validate it every epoch, and ship whichever of the two validates better",
    )
    ema_decay: float = Field(
        0.999, gt=0, lt=1, description="EMA decay per step (warmed up from 0, so short runs average less)"
    )
    batch_size: int | Literal["auto"] = Field(
        "auto",
        description="images per optimisation step; auto = 64, halved for small training sets until an epoch has "
        "10+ steps (never below 8)",
    )
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="adamw | adam | sgd")
    lr: float | Literal["auto"] = Field(
        2e-3, description="peak learning rate; auto = the LR finder's suggestion (see imgclf lr-find)"
    )
    weight_decay: float = Field(0.01, ge=0, description="decoupled (adamw) or L2 (adam, sgd) weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
    nesterov: bool = Field(True, description="sgd: Nesterov momentum")
    scheduler: Literal["cosine", "step", "plateau", "none"] = Field(
        "cosine",
        description="cosine (per step, after warmup) | step | plateau (on the monitored metric) | none",
    )
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup from lr/100 (cosine only)")
    step_size: int = Field(10, ge=1, description="step: epochs between LR decays")
    gamma: float = Field(0.1, gt=0, lt=1, description="step and plateau: factor applied to the LR at each decay")
    plateau_patience: int = Field(3, ge=0, description="plateau: epochs without improvement before a decay")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value; null = off")
    class_weights: Literal["none", "auto"] = Field(
        "none", description="auto = weight the loss by inverse class frequency (imbalanced data)"
    )
    freeze_epochs: int = Field(
        0, ge=0, description="first train only the new head for this many epochs, the backbone frozen (BatchNorm too)"
    )
    unfreeze: int | Literal["all"] = Field(
        "all", description="after the frozen epochs, train all stages, or only the last K stages (an integer)"
    )
    finetune_lr: float | None = Field(
        None, gt=0, description="peak LR after unfreezing (a fresh warmup + cosine); null = lr / 10"
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="discriminative LRs: each layer group below the head gets this factor more (e.g. 0.75); null = off",
    )
    pretrained_bn: Literal["frozen", "train"] = Field(
        "frozen",
        description="BatchNorm statistics of a pretrained backbone: frozen (kept as pretrained, also after "
        "unfreezing; best for small datasets) | train (re-estimated from this data)",
    )
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    calibrate: bool = Field(
        False,
        description="after training, fit a temperature on the validation split so that predicted probabilities "
        "match accuracy (temperature scaling; never changes the predicted class); stored in the model bundle",
    )
    ood_coverage: float = Field(
        0.95,
        gt=0,
        le=1,
        description="after training, the out-of-distribution threshold is set so that this share of validation images "
        "scores below it (the rest: a false-alarm rate on data like the training data); predict --abstain answers "
        "'unknown' above it",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="autocast dtype; auto = bf16 on CPUs and GPUs with native bf16, fp16 on older GPUs, else fp32",
    )
    channels_last: bool = Field(True, description="NHWC memory layout for convolutions (faster on CPU and CUDA)")
    compile: bool = Field(False, description="torch.compile the model (opt-in: slower on CPUs, faster on GPUs)")
    deterministic: bool = Field(
        False,
        description="deterministic kernels everywhere (torch.use_deterministic_algorithms): identical GPU runs, "
        "slower; CPU runs are reproducible without it",
    )
    lr_scaling: Literal["none", "linear"] = Field(
        "none",
        description="under torchrun, where batch_size is per process: linear = multiply lr (and finetune_lr) by the "
        "number of processes (the global batch over the per-process one), with the usual warmup; none = as given",
    )
    sync_batchnorm: bool = Field(
        False, description="under torchrun on GPUs: BatchNorm statistics over every process's batch (SyncBatchNorm)"
    )
    seed: int = Field(0, description="seed for weights init, data order and augmentation")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps")

    @model_validator(mode="before")
    @classmethod
    def _budget_decides_the_length(cls, data: Any) -> Any:
        """With a time budget and no epochs given, the budget decides: epochs becomes a cap it reaches first (the
        same for train --time, tune --time, the Python API and a YAML train.time_budget)."""
        if isinstance(data, Mapping) and data.get("time_budget") is not None and data.get("epochs") is None:
            return {**data, "epochs": BUDGET_EPOCHS}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lr != "auto" and not 0 < self.lr <= MAX_LR:
            raise ValueError(
                f"lr must be a positive number up to {MAX_LR:.4g} (float32), or 'auto'; received {self.lr}"
            )
        if self.finetune_lr is not None and not 0 < self.finetune_lr <= MAX_LR:
            raise ValueError(
                f"finetune_lr must be a positive number up to {MAX_LR:.4g} (float32); received {self.finetune_lr}"
            )
        if self.unfreeze != "all" and self.unfreeze < 1:
            raise ValueError(f"unfreeze must be 'all' or a number of stages >= 1; received {self.unfreeze}")
        if self.time_budget is not None and self.scheduler != "cosine":
            raise ValueError(
                f"time_budget lays a warmup + cosine schedule over the steps that fit; scheduler must be cosine, "
                f"received '{self.scheduler}'"
            )
        if self.freeze_epochs >= self.epochs:
            raise ValueError(
                f"freeze_epochs ({self.freeze_epochs}) must be smaller than epochs ({self.epochs}), "
                "or the backbone is never fine-tuned"
            )
        return self

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            parse_duration(value, "time_budget")
        except ConfigError as exc:
            raise ValueError(str(exc).replace("time_budget takes", "takes")) from None
        return str(value)

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        return _at_least_or_auto(value, 1)


class TrackingConfig(_Section):
    """Where a run is recorded besides its folder (each sink is an optional extra, off by default). A sink that
    fails, or a tracking server that cannot be reached, warns once and never stops or slows training."""

    mlflow: bool = Field(
        False,
        description="also log to MLflow (pip install 'imgclf[tracking]'): the config as params, one value per epoch, "
        "test metrics, report, confusion matrix and the model bundle as artifacts",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (a server's http://host:5000, sqlite:///mlflow.db, ...); null = "
        "$MLFLOW_TRACKING_URI, else MLflow's own default (./mlflow.db)",
    )
    mlflow_experiment: str = Field("imgclf", description="MLflow experiment the runs are logged under")
    tensorboard: bool = Field(
        False,
        description="write TensorBoard event files into <run>/tensorboard (pip install 'imgclf[tracking]'): "
        "scalars per epoch, learning rate, a sample grid and the confusion matrix",
    )
    callbacks: tuple[str, ...] = Field(
        (),
        description="more callbacks, as import paths 'package.module:name' of a Callback class (or factory) that "
        "takes no arguments",
    )

    @field_validator("callbacks")
    @classmethod
    def _import_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            module, sep, name = path.partition(":")
            if not sep or not module or not name:
                raise ValueError(f"callbacks are import paths 'package.module:name'; received '{path}'")
        return value


class RunConfig(_Section):
    """Everything that defines a training run."""

    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.train.time_budget is not None and self.augment.min_res is not None:
            # the resolution ramp is laid over train.epochs, which a budget makes an upper bound only
            raise ValueError(
                "augment.min_res (progressive resizing over train.epochs) cannot be combined with "
                f"train.time_budget (the budget decides how many epochs run); received min_res "
                f"{self.augment.min_res} and time_budget {self.train.time_budget}: drop one of them"
            )
        return self
