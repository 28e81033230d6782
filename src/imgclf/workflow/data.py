"""The data steps of the workflow: `scan_data` (one scan and split shared by several runs), `split` (a split
copy of a folder), a run's preparation (`_prepare`: fast checks, the scan, the data-dependent settings) and the
data records it leaves in its folder (manifest, problems, duplicates, label issues)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.config import RunConfig, build_config
from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.data.layout import check_training_folder
from imgclf.data.leaks import find_duplicates, save_duplicates, warn_about_duplicates
from imgclf.data.scan import ImageIndex, Problem
from imgclf.data.settings import resolve_data_settings
from imgclf.data.split import LinkMode, SplitData, SplitManifest, materialize_split, scan_and_split
from imgclf.errors import DataError, ImgclfError
from imgclf.files import write_csv_atomic
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tracking.runs import RunPaths, check_writable
from imgclf.training import distributed
from imgclf.workflow.results import SplitResult

__all__ = ["PROBLEM_COLUMNS", "ScannedData", "scan_data", "split"]

log = logging.getLogger(__name__)

PROBLEM_COLUMNS = ("path", "reason")


@dataclass(frozen=True)
class ScannedData:
    """A folder scanned and split once (`scan_data`), for several runs on it (tuning trials)."""

    root: Path  # resolved
    settings: tuple  # the data settings it was split with (`_split_settings`)
    index: ImageIndex
    manifest: SplitManifest
    split: SplitData | None = None  # with the duplicates across splits and the groups


def scan_data(
    data: Path | str, config: RunConfig | Mapping[str, Any] | None = None, *, progress: Progress = NO_PROGRESS
):
    """Scan and split a dataset folder as `train` would with `config`'s data settings, once, so that several runs
    (`train(..., scanned=...)`) share the hashes and decode checks instead of repeating them.

    Raises:
        DataError: the folder is missing or train would refuse it.
    """
    settings = build_config(config).data
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (expected a folder of class folders)")
    check_training_folder(root)

    def scan() -> ScannedData:
        split = scan_and_split(
            root.resolve(),
            ratios=settings.split_ratios,
            seed=settings.split_seed,
            max_pixels=settings.max_pixels,
            subset=settings.subset,
            near_duplicates=settings.near_duplicates,
            groups=settings.groups,
            groups_csv=settings.groups_csv,
            exclude=settings.exclude,
            cache_dir=settings.cache_dir,
            progress=progress,
        )
        return ScannedData(root.resolve(), _split_settings(settings), split.index, split.manifest, split)

    # under torchrun rank 0 scans (hashing every file once) and hands the split to the others
    return distributed.on_main(distributed.current(), scan)


def _split_settings(settings) -> tuple:
    """The data settings a scan and split depend on: a `ScannedData` made with others is not reused."""
    return (
        tuple(settings.split_ratios),
        settings.split_seed,
        settings.max_pixels,
        settings.subset,
        settings.near_duplicates,
        settings.groups,
        settings.groups_csv,
        settings.exclude,
    )


def split(
    source: Path | str,
    target: Path | str,
    *,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    mode: LinkMode = "hardlink",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    near_duplicates: bool = True,
    groups: str | None = None,
    groups_csv: Path | str | None = None,
    progress: Progress = NO_PROGRESS,
) -> SplitResult:
    """Write a seeded, stratified train/val/test copy (hard links by default) of a flat class-folder dataset, with
    identical files, near-duplicates and groups each kept in one split.

    Args:
        source: `source/<class>/...` (a folder that is already split keeps its split).
        target: a new or empty folder; receives `{train,val,test}/<class>/` and nothing else.
        ratios: train/val/test fractions.
        seed: the same seed gives the same split.
        mode: hardlink | copy | symlink.
        max_pixels: images above this are skipped as problems.
        near_duplicates: find near-duplicates and keep them together (as `data.near_duplicates`).
        groups: a regular expression naming each image's group from its relative path (as `data.groups`).
        groups_csv: a CSV of path, group (as `data.groups_csv`).
        progress: progress reporter.

    Example:
        >>> import imgclf
        >>> imgclf.split("photos/", "photos_split/").counts  # 3 classes of 30 images
        {'train': 72, 'val': 9, 'test': 9}
    """
    data = build_config(
        None,
        {"data.split_ratios": list(ratios), "data.groups": groups, "data.groups_csv": groups_csv},
    ).data
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"target {target} exists and is not empty; choose a new folder (nothing was written)")
    if not Path(source).is_dir():
        raise DataError(f"dataset folder not found: {source} (expected a folder of class folders)")
    scanned = scan_and_split(
        Path(source),
        ratios=data.split_ratios,
        seed=seed,
        max_pixels=max_pixels,
        near_duplicates=near_duplicates,
        groups=data.groups,
        groups_csv=data.groups_csv,
        progress=progress,
    )
    warn_about_duplicates(scanned.duplicates)
    counts = materialize_split(scanned.manifest, target, mode=mode)
    return SplitResult(
        target=target,
        counts=counts,
        problems=scanned.index.problems,
        duplicates=len(scanned.duplicates),
        near_duplicates=len(scanned.near),
    )


@dataclass(frozen=True)
class _Prepared:
    config: RunConfig  # with the data-dependent settings resolved
    index: ImageIndex
    manifest: SplitManifest
    weights: Any  # PretrainedWeights or None
    split: SplitData | None = None  # the duplicates across splits and the groups


def _prepare(
    data: Path, config: RunConfig, *, out: Path | None = None, scanned: ScannedData | None = None, progress: Progress
) -> _Prepared:
    """Check the model, device and pretrained weights (fast failures first), then scan, split (or reuse `scanned`,
    when it is this folder split with these settings) and resolve."""
    from imgclf.builders import is_pretrained
    from imgclf.device import select_device
    from imgclf.models.registry import check_model_name
    from imgclf.models.weights import check_pretrained_request, find_weights

    model = config.model
    check_model_name(model.name)
    select_device(config.train.device)
    check_pretrained_request(model.name, model.pretrained, model.weights)
    weights = find_weights(model.name, model.weights) if is_pretrained(config) else None
    if not data.is_dir():  # before --out is created: a typo leaves nothing behind
        raise DataError(f"dataset folder not found: {data} (expected a folder of class folders)")
    group = distributed.current()
    if out is not None:
        distributed.on_main(group, lambda: check_writable(out))
    # absolute paths: the manifest (and the cache key) must work from any working directory
    if scanned is None or scanned.root != data.resolve() or scanned.settings != _split_settings(config.data):
        scanned = scan_data(data, config, progress=progress)
    index, manifest = scanned.index, scanned.manifest
    resolved = resolve_data_settings(config, index, manifest, weights=weights, processes=group.world_size)
    return _Prepared(resolved, index, manifest, weights, scanned.split)


def _look_for_label_issues(paths: RunPaths, config: RunConfig, manifest: SplitManifest, *, progress: Progress) -> None:
    """label_issues.csv and label_issues.json when `data.label_issues` asks (auto: by the number of images). Under
    auto a failure (no pretrained weights offline) is a warning; asked for explicitly, it stops the run."""
    from imgclf.device import select_device
    from imgclf.evaluation.label_issues import find_label_issues, label_issues_wanted, save_label_issues
    from imgclf.files import write_json_atomic

    setting = config.data.label_issues
    if not label_issues_wanted(setting, len(manifest.rows)):
        return
    try:
        found = find_label_issues(
            manifest.rows,
            max_pixels=config.data.max_pixels,
            cache_dir=config.data.cache_dir,
            device=str(select_device(config.train.device)),
            progress=progress,
        )
    except ImgclfError as exc:
        if setting is True:
            raise
        log.warning("label issues not looked for (data.label_issues: auto): %s", exc)
        return
    save_label_issues(found, paths.label_issues)
    write_json_atomic(paths.label_issues_summary, found.summary())


def _write_data_records(
    paths: RunPaths, problems: Sequence[Problem], manifest: SplitManifest, split: SplitData | None
) -> None:
    write_csv_atomic(paths.problems, PROBLEM_COLUMNS, ((str(p.path), p.reason) for p in problems))
    manifest.save(paths.manifest)
    duplicates = list(split.duplicates) if split is not None else find_duplicates(manifest)
    warn_about_duplicates(duplicates)
    save_duplicates(duplicates, paths.duplicates)
    for split_name, counter in manifest.counts().items():
        log.info("%s: %d images in %d classes", split_name, sum(counter.values()), len(counter))
