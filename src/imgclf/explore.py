"""Look before training: `inspect` (what is in a dataset, what is wrong with it) and `preview` (what the
augmentation does to it). Both write files a person opens; neither changes the data."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf.data.images import DEFAULT_MAX_PIXELS, is_single_channel, load_image, load_thumbnail, open_image
from imgclf.errors import DataError, ImageError
from imgclf.files import write_atomic, write_csv_atomic, write_json_atomic
from imgclf.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from imgclf.data.groups import GroupSpan
    from imgclf.data.leaks import Duplicate
    from imgclf.data.scan import ImageIndex, Problem
    from imgclf.data.split import SplitData, SplitManifest

__all__ = ["PROBLEM_COLUMNS", "SAMPLES_PER_CLASS", "THUMBNAIL", "InspectResult", "inspect_data", "preview_augmentation"]

log = logging.getLogger(__name__)

SAMPLES_PER_CLASS = 8
THUMBNAIL = 96
# inspect's problems.csv; severity: error (train would stop), warning (train would warn), skipped (a file train
# skips: unreadable, too small, not an image...)
PROBLEM_COLUMNS = ("path", "reason", "severity")


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
    subset: int | None = None,
    near_duplicates: bool = True,
    groups: str | None = None,
    groups_csv: Path | str | None = None,
    exclude: Path | str | None = None,
    labels: bool = False,
    cache_dir: Path | str | None = None,
    progress: Progress = NO_PROGRESS,
) -> InspectResult:
    """Scan a dataset the way `train` would and write what a person should know before training on it.

    Everything `train` would stop at (an empty class folder, a val class that train lacks, no class folders, no
    validation split...) is listed, with `train`'s own message, instead of stopping at the first; so is what it
    would only warn about. Writes into `out`: `dataset.json` (counts per split and class, imbalance, image
    sizes, duplicates, groups, `errors` and `warnings`), `problems.csv` (one row per error, warning and skipped
    file: path, reason, severity), `duplicates.csv` (identical and near-duplicate images across the splits `train`
    would use, or across labels: both paths, the distance, the method that found them), `samples.png` (a grid of
    training images per class) and, with `labels`, `label_issues.csv` and `label_issues.png`
    (`evaluation.label_issues`).

    Args:
        data: `root/{train,val,test}/<class>/` or `root/<class>/`.
        out: output folder; default `inspect-<data folder name>` in the current folder.
        ratios: train/val/test fractions (as `data.split_ratios`: a flat folder is split by them, a split
            folder without val/ gets val carved out of train/).
        seed: split seed (as `data.split_seed`).
        max_pixels: larger images are reported as problems (as `data.max_pixels`).
        subset: look at N images per class and split only (as `data.subset`; the others are not decoded).
        near_duplicates: look for near-duplicates too (as `data.near_duplicates`).
        groups: a regular expression naming each image's group from its path (as `data.groups`); groups that
            span splits made by hand are listed.
        groups_csv: a CSV of path, group (as `data.groups_csv`).
        exclude: images to leave out (as `data.exclude`).
        labels: also look for likely mislabelled images (confident learning, `evaluation.label_issues`).
        cache_dir: where per-image features are cached (as `data.cache_dir`).
        progress: progress reporter.

    Returns:
        The summary (`summary["errors"]` is empty when `train` would accept the data) and the output folder.

    Raises:
        DataError: `data` is not a folder.
        ImgclfError: `out` cannot be written.

    Example:
        >>> inspect_data("data/").summary["imbalance_ratio"]  # 30 images in each class
        1.0
    """
    from imgclf.data.split import scan_and_split
    from imgclf.tracking.runs import check_writable

    root = Path(data)
    out_dir = Path(out) if out else Path(f"inspect-{root.resolve().name}")
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (expected a folder of class folders)")
    check_writable(out_dir)
    scanned = scan_and_split(
        root,
        ratios=ratios,
        seed=seed,
        max_pixels=max_pixels,
        subset=subset,
        collect_errors=True,
        near_duplicates=near_duplicates,
        groups=groups,
        groups_csv=Path(groups_csv) if groups_csv else None,
        exclude=Path(exclude) if exclude else None,
        cache_dir=Path(cache_dir) if cache_dir else None,
        progress=progress,
    )
    errors, warnings = _findings(root, scanned)
    rule = groups or (str(groups_csv) if groups_csv else None)
    settings = {"split_ratios": list(ratios), "split_seed": seed, "max_pixels": max_pixels}
    summary = _summary(
        root, scanned, errors, warnings, near_duplicates=near_duplicates, groups_rule=rule, settings=settings
    )
    _write_findings(out_dir, summary, errors, warnings, scanned)
    if labels:
        summary["label_issues"] = _label_issues(scanned.manifest, out_dir, max_pixels, cache_dir, progress)
        write_json_atomic(out_dir / "dataset.json", summary)
    _write_samples(out_dir / "samples.png", scanned, seed)
    log.info("dataset summary, problems, duplicates and samples.png in %s", out_dir)
    return InspectResult(summary, out_dir)


def _findings(root: Path, scanned: SplitData) -> tuple[list[Problem], list[Problem]]:
    """Every error and warning `train` would give for this data: the scan's, then the split's (each warning once)."""
    from imgclf.data.scan import Problem

    index = scanned.index
    errors, warnings = list(index.errors), [Problem(root, message) for message in index.warnings]
    errors_after_split, warnings_after_split = _split_findings(
        root, index, scanned.manifest, scanned.duplicates, scanned.spans
    )
    errors += errors_after_split
    warnings += [w for w in warnings_after_split if w.reason not in index.warnings]
    return errors, warnings


def _summary(
    root: Path,
    scanned: SplitData,
    errors: Sequence[Problem],
    warnings: Sequence[Problem],
    *,
    near_duplicates: bool,
    groups_rule: str | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """What dataset.json holds: counts, sizes, duplicates, groups, the `settings` used (split ratios and seed, the
    pixel limit) and the findings."""
    index, duplicates = scanned.index, scanned.duplicates
    counts = scanned.manifest.counts()
    train_counts = [counts["train"].get(name, 0) for name in index.classes]
    widths = [record.width for record in index.records]
    heights = [record.height for record in index.records]
    return {
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
            "leaks_across_splits": sum(d.issue == "leak across splits" and d.kind == "exact" for d in duplicates),
            "near_leaks_across_splits": sum(d.issue == "leak across splits" and d.kind == "near" for d in duplicates),
            "label_conflicts": sum(d.issue == "label conflict" for d in duplicates),
            "near_duplicate_pairs": len(scanned.near) if near_duplicates else None,
        },
        "groups": {
            "rule": groups_rule,
            "images_in_groups": len(scanned.groups),
            "groups": len(set(scanned.groups.values())),
            "spanning_splits": [{"group": span.group, "splits": span.splits} for span in scanned.spans],
        },
        **settings,
        "ready_to_train": not errors,
        "errors": [problem.reason for problem in errors],
        "warnings": [problem.reason for problem in warnings],
    }


def _write_findings(
    out_dir: Path, summary: dict[str, Any], errors: Sequence[Problem], warnings: Sequence[Problem], scanned: SplitData
) -> None:
    """dataset.json, problems.csv (errors, warnings, then the files train skips) and duplicates.csv."""
    from imgclf.data.leaks import save_duplicates

    write_json_atomic(out_dir / "dataset.json", summary)
    rows = [
        *((p.path, p.reason, "error") for p in errors),
        *((p.path, p.reason, "warning") for p in warnings),
        *((p.path, p.reason, "skipped") for p in scanned.index.problems),
    ]
    write_csv_atomic(out_dir / "problems.csv", PROBLEM_COLUMNS, rows)
    save_duplicates(scanned.duplicates, out_dir / "duplicates.csv")


def _write_samples(path: Path, scanned: SplitData, seed: int) -> None:
    """samples.png: up to SAMPLES_PER_CLASS training images per class, drawn with the split seed."""
    from imgclf.evaluation.grids import sample_grid_figure

    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {}
    for name in scanned.index.classes:
        files = [row.path for row in scanned.manifest.split("train") if row.label == name]
        chosen = sorted(rng.permutation(len(files))[:SAMPLES_PER_CLASS])
        samples[name] = [load_thumbnail(files[i], color="rgb", size=THUMBNAIL) for i in chosen]
    figure = sample_grid_figure(samples)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


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
    from imgclf.data.layout import collect_inputs
    from imgclf.data.preprocessing import Preprocessing, eval_pixels
    from imgclf.data.transforms import auto_img_size, resolve_preset
    from imgclf.evaluation.grids import augmentation_preview_figure

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


def _split_findings(
    root: Path, index: ImageIndex, manifest: SplitManifest, duplicates: Sequence[Duplicate], spans: Sequence[GroupSpan]
) -> tuple[list[Problem], list[Problem]]:
    """Errors and warnings that only the split shows: what `train` says about the manifest it would use."""
    from imgclf.data.scan import Problem

    errors: list[Problem] = []
    warnings: list[Problem] = []
    if not index.classes:  # nothing to split; the scan's errors say why
        return errors, warnings
    counts = manifest.counts()
    if not counts["val"]:  # builders.make_loaders raises this before the first epoch
        errors.append(
            Problem(
                root,
                "no validation images: add a val folder or give data.split_ratios a val share > 0 "
                "(model selection and early stopping need a validation split)",
            )
        )
    if not counts["test"]:
        warnings.append(
            Problem(
                root,
                "no test images: train reports validation metrics instead (optimistic: the model was selected on "
                "them); add a test folder or give data.split_ratios a test share > 0",
            )
        )
    for split in ("val", "test"):
        missing = [name for name in index.classes if counts[split] and not counts[split][name]]
        if missing:
            warnings.append(Problem(root, f"{split} split has no images of class(es): {', '.join(missing)}"))
    exact = sum(d.kind == "exact" for d in duplicates)
    if exact:
        warnings.append(
            Problem(
                root,
                f"{exact} identical image pair(s) across splits or labels (leaks inflate test accuracy); "
                "the pairs are in duplicates.csv",
            )
        )
    near = [d for d in duplicates if d.kind == "near"]
    if near:
        warnings.append(
            Problem(
                root,
                f"{len(near)} near-duplicate pair(s) across splits or labels (the same picture saved again: leaks "
                "inflate test accuracy); the pairs, with their distance, are in duplicates.csv",
            )
        )
    if spans:
        shown = "; ".join(span.describe() for span in spans[:5])
        more = f" and {len(spans) - 5} more" if len(spans) > 5 else ""
        warnings.append(
            Problem(
                root,
                f"{len(spans)} group(s) span the splits made by hand: {shown}{more}; a model tested on a group it "
                "trained on is partly tested on memory: move each group into one split",
            )
        )
    return errors, warnings


def _label_issues(manifest: SplitManifest, out_dir: Path, max_pixels: int, cache_dir, progress: Progress):
    """label_issues.csv and label_issues.png for every image of the manifest; the summary's `label_issues`."""
    from imgclf.evaluation.label_issues import find_label_issues, label_issues_figure, save_label_issues

    found = find_label_issues(
        manifest.rows, max_pixels=max_pixels, cache_dir=Path(cache_dir) if cache_dir else None, progress=progress
    )
    save_label_issues(found, out_dir / "label_issues.csv")
    figure = label_issues_figure(found.issues)
    if figure is not None:
        write_atomic(out_dir / "label_issues.png", lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return found.summary()


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
