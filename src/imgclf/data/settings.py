"""The data-dependent settings of a run, resolved before it trains: colour, image size, crop, interpolation,
mean/std, the augmentation preset, the batch size and small_cnn's whitening layer, from explicit values, then the
pretrained model's configuration, then what the training images say. config.yaml records the result;
`preprocessing_of` turns it into the `Preprocessing` that travels with the model."""

from __future__ import annotations

import logging

from imgclf.config import RunConfig, build_config
from imgclf.data.preprocessing import Preprocessing
from imgclf.data.scan import ImageIndex
from imgclf.data.split import SplitManifest
from imgclf.errors import ConfigError

__all__ = ["auto_whiten", "preprocessing_of", "resolve_data_settings"]

log = logging.getLogger(__name__)


def resolve_data_settings(
    config: RunConfig, index: ImageIndex, manifest: SplitManifest, *, weights, processes: int = 1
) -> RunConfig:
    """Fill every preprocessing setting left open: explicit values win, then the pretrained model's config
    (size, crop, interpolation, mean/std), then what the training images say. config.yaml records the result.

    Colour `auto` with pretrained weights follows the stem they were trained with: an RGB stem gets RGB input
    (grayscale images replicated to 3 channels, exactly what it saw in pretraining), a 1-channel stem gets gray.
    An explicit colour that differs from the stem gets the stem adapted instead (`weights.adapt_stem`). An automatic
    batch size counts the training images of one of `processes` processes (torchrun: the batch is per process)."""
    from imgclf.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from imgclf.data.transforms import auto_img_size, resolve_preset
    from imgclf.models.registry import SMALL_CNN
    from imgclf.models.weights import pretrained_config, stem_channels

    data = config.data
    pretrained = weights is not None
    cfg = (pretrained_config(config.model.name) or {}) if pretrained else {}
    train_paths = {row.path for row in manifest.split("train")}
    train_records = [r for r in index.records if r.path in train_paths]
    color = data.color
    if color == "auto":
        if pretrained:
            color = "gray" if stem_channels(config.model.name, weights) == 1 else "rgb"
            if color == "rgb" and all(r.single_channel for r in train_records):
                log.info("color: rgb (grayscale images are replicated to 3 channels for the pretrained stem)")
        else:
            color = "gray" if all(r.single_channel for r in train_records) else "rgb"
            log.info(
                "color: %s (%s)",
                color,
                "every training image is single-channel"
                if color == "gray"
                else "some training images have colour channels",
            )
    img_size = data.img_size or (cfg["input_size"][-1] if cfg.get("input_size") else None)
    img_size = img_size or auto_img_size([(r.width, r.height) for r in train_records])
    interpolation = data.interpolation or cfg.get("interpolation")
    interpolation = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    mean = tuple(data.mean or cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(data.std or cfg.get("std") or IMAGENET_STD)
    if color == "gray" and len(mean) == 3:
        mean, std = (round(sum(mean) / 3, 4),), (round(sum(std) / 3, 4),)
    preset = resolve_preset(config.augment.preset, img_size)
    whiten = config.model.whiten
    if whiten == "auto" and config.model.name == SMALL_CNN:
        whiten = auto_whiten(len(train_records), weights)
    batch_size = config.train.batch_size
    if batch_size == "auto":
        from imgclf.config import auto_batch_size

        per_process = -(-len(train_records) // processes)
        batch_size = auto_batch_size(per_process)
        log.info(
            "batch size: %d (auto, for %d training images%s)", batch_size, per_process, " per process" * (processes > 1)
        )
    return build_config(
        config,
        {
            "train.batch_size": batch_size,
            "augment.preset": preset,
            "model.whiten": whiten,
            "data.color": color,
            "data.img_size": img_size,
            "data.crop_pct": data.crop_pct or cfg.get("crop_pct") or 1.0,
            "data.interpolation": interpolation,
            "data.mean": list(mean),
            "data.std": list(std),
        },
    )


WHITEN_FROM_IMAGES = 10_000  # small_cnn's whitening layer: on from this many training images (model.whiten: auto)


def auto_whiten(train_images: int, weights) -> bool:
    """`model.whiten: auto` for small_cnn: with small_cnn weights, whatever they were trained with (they fit no other
    first layer); else on from WHITEN_FROM_IMAGES training images. Measured: Fashion-MNIST's 54,000 at 5 minutes
    gain 0.43 points (docs/benchmarks.md); the 1,617 training digits of `imgclf demo`, 10 epochs, seeds 0-4, scored
    0.9955 with it against 0.9989 without (179 test images: level, with one seed 2 points down)."""
    from imgclf.models.weights import has_whitening

    if weights is not None:
        return has_whitening(weights)
    on = train_images >= WHITEN_FROM_IMAGES
    log.info(
        "whitening layer: %s (auto: %d training images, %s %d)",
        "on" if on else "off",
        train_images,
        "at least" if on else "under",
        WHITEN_FROM_IMAGES,
    )
    return on


def preprocessing_of(config: RunConfig) -> Preprocessing:
    data = config.data
    if data.color == "auto" or None in (data.img_size, data.crop_pct, data.interpolation, data.mean, data.std):
        raise ConfigError("internal: preprocessing settings must be resolved before training")
    return Preprocessing(
        img_size=data.img_size,
        color=data.color,
        mean=tuple(data.mean),
        std=tuple(data.std),
        crop_pct=data.crop_pct,
        interpolation=data.interpolation,
    )
