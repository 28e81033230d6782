"""Look before training: `inspect` (what is in a dataset, what is wrong with it) and `preview` (what the
augmentation does to it). Both write files a person opens; neither changes the data."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.images import DEFAULT_MAX_PIXELS, is_single_channel, load_image, load_thumbnail, open_image
from imgclf.errors import DataError, ImageError
from imgclf.files import write_atomic, write_csv_atomic, write_json_atomic
from imgclf.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

SAMPLES_PER_CLASS = 8
THUMBNAIL = 96


@dataclass(frozen=True)
class InspectResult:
    """The dataset summary (also in `dataset.json`) and the folder holding it."""

    summary: dict[str, Any]
    out_dir: Path


def inspect_data(
    data: Path | str,
    *,
    out: Path | str | None = None,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress = NO_PROGRESS,
) -> InspectResult:
    """Scan a dataset the way `train` would and write what a person should know before training on it.

    Writes `dataset.json` (counts per split and class, imbalance, image sizes, duplicates), `problems.csv`
    (skipped files and why), `duplicates.csv` (identical images across the splits `train` would use, or across
    labels) and `samples.png` (a grid of images per class) into `out`.

    Args:
        data: `root/{train,val,test}/<class>/` or `root/<class>/`.
        out: output folder; default `inspect-<data folder name>` in the current folder.
        ratios: train/val/test fractions for a flat layout (as `train` would split it).
        seed: split seed (as `data.split_seed`).
        max_pixels: larger images are reported as problems.
        progress: progress reporter.

    Returns:
        The summary and the output folder.

    Example:
        >>> inspect_data("data/").summary["imbalance_ratio"]
        1.25
    """
    from imgclf.data.scan import scan_folder
    from imgclf.data.split import find_duplicates, make_manifest, save_duplicates
    from imgclf.evaluation.plots import sample_grid_figure

    root = Path(data)
    out_dir = Path(out) if out else Path(f"inspect-{root.resolve().name}")
    index = scan_folder(root, max_pixels=max_pixels, progress=progress)
    manifest = make_manifest(index, ratios=ratios, seed=seed)
    duplicates = find_duplicates(manifest)
    counts = manifest.counts()
    train_counts = [counts["train"].get(name, 0) for name in index.classes]
    widths = [record.width for record in index.records]
    heights = [record.height for record in index.records]
    summary: dict[str, Any] = {
        "root": str(root),
        "layout": index.layout,
        "classes": list(index.classes),
        "images": len(index.records),
        "counts": {split: dict(sorted(counter.items())) for split, counter in counts.items()},
        "imbalance_ratio": round(max(train_counts) / max(min(train_counts), 1), 3) if train_counts else None,
        "smallest_class": min(zip(train_counts, index.classes))[1] if train_counts else None,
        "width": _spread(widths),
        "height": _spread(heights),
        "grayscale_fraction": round(sum(r.single_channel for r in index.records) / max(len(index.records), 1), 3),
        "skipped_files": len(index.problems),
        "hidden_files": index.hidden_files,
        "ignored_files": index.ignored_files,
        "duplicates": {
            "leaks_across_splits": sum(d.kind == "leak across splits" for d in duplicates),
            "label_conflicts": sum(d.kind == "label conflict" for d in duplicates),
        },
        "warnings": list(index.warnings),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "dataset.json", summary)
    write_csv_atomic(out_dir / "problems.csv", ("path", "reason"), ((p.path, p.reason) for p in index.problems))
    save_duplicates(duplicates, out_dir / "duplicates.csv")
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {}
    for name in index.classes:
        files = [row.path for row in manifest.split("train") if row.label == name]
        chosen = sorted(rng.permutation(len(files))[:SAMPLES_PER_CLASS])
        samples[name] = [load_thumbnail(files[i], color="rgb", size=THUMBNAIL) for i in chosen]
    figure = sample_grid_figure(samples)
    write_atomic(out_dir / "samples.png", lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    log.info("dataset summary, problems, duplicates and samples.png in %s", out_dir)
    return InspectResult(summary, out_dir)


def preview_augmentation(
    data: Path | str,
    *,
    out: Path | str = "preview.png",
    preset: str = "auto",
    hflip: bool = True,
    vflip: bool = False,
    img_size: int | None = None,
    images: int = 4,
    versions: int = 7,
    seed: int = 0,
) -> Path:
    """Draw a few training images next to augmented versions of them, as the fast (cached) path makes them.

    Args:
        data: a dataset folder (its `train/` part when split), or any folder of images.
        out: the PNG to write.
        preset: auto | none | light | standard | strong (auto as `train` resolves it from the image size).
        hflip: random horizontal flips.
        vflip: random vertical flips.
        img_size: training resolution; default the one `train` would pick from these images.
        images: how many images (rows).
        versions: augmented versions per image (columns after the original).
        seed: picks the images and the augmentation draws.

    Returns:
        The written PNG.

    Example:
        >>> preview_augmentation("data/", preset="strong")
        PosixPath('preview.png')
    """
    import torch

    from imgclf.data.batch_transforms import BatchAugment
    from imgclf.data.cache import stored_square
    from imgclf.data.preprocessing import Preprocessing, eval_pixels
    from imgclf.data.scan import collect_inputs
    from imgclf.data.transforms import auto_img_size, resolve_preset
    from imgclf.evaluation.plots import augmentation_preview_figure

    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of images")
    files = collect_inputs([root / "train" if (root / "train").is_dir() else root])
    if not files:
        raise DataError(f"no image files found in {root}")
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.permutation(len(files))[:images])]
    gray = all(_single_channel(path) for path in chosen)
    decoded = [load_image(path, color="gray" if gray else "rgb") for path in chosen]
    size = img_size or auto_img_size([image.size for image in decoded])
    pre = Preprocessing.default_for(size, "gray" if gray else "rgb")
    preset = resolve_preset(preset, size)
    batch = torch.stack([stored_square(image, pre) for image in decoded])  # what the cache would hold
    augment = BatchAugment(pre, preset, hflip=hflip, vflip=vflip)
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    torch.manual_seed(seed)
    drawn = [(augment(batch) * std + mean).clamp(0, 1) for _ in range(versions)]
    augmented = [[_to_display(version[i]) for version in drawn] for i in range(len(chosen))]
    originals = [np.asarray(eval_pixels(image, pre)) for image in decoded]
    mixing = " (MixUp/CutMix, which mix whole batches, are not drawn)" if preset == "strong" else ""
    title = f"augment preset {preset}, {size}px, hflip {'on' if hflip else 'off'}{mixing}"
    figure = augmentation_preview_figure(originals, augmented, title=title)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return target


def _to_display(image) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> HxW or HxWx3 float array for matplotlib."""
    array = image.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def _single_channel(path: Path) -> bool:
    try:
        with open_image(path) as image:
            return is_single_channel(image)
    except (ImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _spread(values: Sequence[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
