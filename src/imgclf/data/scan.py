"""Walk an image folder, decode-check and hash every image, and report every file that was skipped.

Layouts (found by `imgclf.data.layout`):
- split: `root/{train,val,test}/<class>/...` (`valid` and `validation` are accepted for val; val and test
  are optional);
- flat: `root/<class>/...`, split later by `imgclf.data.split`.

Images may sit in nested folders below their class folder. Hidden files and folders (`.DS_Store`, `._x.jpg`,
`.ipynb_checkpoints`) and `__MACOSX` are skipped. Files are recognised by content, not extension: a PNG named
`.jpg` is used, a text file named `.png` is a problem, a `notes.txt` is ignored (counted). Every image is
decoded fully once (a truncated JPEG passes `Image.verify()`, so verify is not enough) and hashed (sha256).
User files are only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from imgclf.cpus import usable_cpus
from imgclf.data.images import DEFAULT_MAX_PIXELS, is_single_channel, open_image
from imgclf.data.layout import Blockers, Problem, find_class_folders, looks_like_image, walk_files
from imgclf.data.parallel import map_indices
from imgclf.errors import DataError, ImageError
from imgclf.progress import NO_PROGRESS, Progress

__all__ = ["MIN_SIDE", "Exclusions", "ImageIndex", "ImageRecord", "Problem", "read_exclude_list", "scan_folder"]

log = logging.getLogger(__name__)

MIN_SIDE = 8  # smaller images (icons, tracking pixels, broken thumbnails) are skipped as problems


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: where it is, its class, the split its folder names (None in a flat layout)."""

    path: Path
    label: str
    split: str | None
    sha256: str
    width: int
    height: int
    single_channel: bool


@dataclass(frozen=True)
class ImageIndex:
    """What a scan found: usable images, skipped files and the class list (from the training split only).

    `errors` is empty unless the scan collected what would stop training instead of raising it
    (`scan_folder(..., collect_errors=True)`, for `imgclf inspect`).
    """

    root: Path
    layout: Literal["split", "flat"]
    records: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...]
    classes: tuple[str, ...]
    ignored_files: int = 0
    hidden_files: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)
    errors: tuple[Problem, ...] = field(default_factory=tuple)

    def counts(self) -> dict[str | None, Counter[str]]:
        """Images per class for each split named by the folders (None for a flat layout)."""
        result: dict[str | None, Counter[str]] = {}
        for record in self.records:
            result.setdefault(record.split, Counter())[record.label] += 1
        return result


def scan_folder(
    root: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    labelled_only: bool = False,
    collect_errors: bool = False,
    subset: int | None = None,
    subset_seed: int = 0,
    flat_splits: int = 3,
    exclude: Exclusions | None = None,
    progress: Progress = NO_PROGRESS,
) -> ImageIndex:
    """Scan an image folder in the split or flat layout.

    Args:
        root: the dataset folder.
        max_pixels: images larger than this are skipped as problems.
        workers: decoding processes (large folders, Linux) or threads; None = one per core, at least 2.
        labelled_only: a folder of labelled images to evaluate on, not to train on: split folders without
            `train/` (a `test/` alone) are fine, and any number of classes; the class list is every class found.
        collect_errors: do not raise what would stop training (the DataErrors below, with the same messages):
            record each in `ImageIndex.errors` and go on, so that `imgclf inspect` lists them all. A missing
            folder still raises.
        subset: start small: keep `subset` files per class and split (a flat layout: `subset * flat_splits` per
            class, for the split to share out), drawn with `subset_seed`; the others are not decoded at all.
        subset_seed: the seed of that draw.
        flat_splits: how many splits a flat folder's subset will be split into.
        exclude: images to leave out (`read_exclude_list`, `data.exclude`): not decoded, listed as problems with
            the list that excluded them.
        progress: reporter for the decode pass.

    Returns:
        The `ImageIndex`; its class list comes from the training split only, sorted.

    Raises:
        DataError: the folder is missing or unusable: no training images, fewer than 2 classes, a class folder
            with no readable image, or a val/test class that training lacks.

    Example:
        >>> index = scan_folder(Path("data"))
        >>> index.classes, index.layout, len(index.records)
        (('digit0', 'digit1', 'digit2'), 'flat', 90)
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (expected a folder of class folders)")
    blockers = Blockers(collect=collect_errors)
    # 1. the layout and every file under its class folders
    found_layout = find_class_folders(root, need_train=not labelled_only, blockers=blockers)
    layout, class_dirs, loose = found_layout.kind, found_layout.class_dirs, found_layout.loose
    dataset_dirs = found_layout.dataset_dirs(root)
    walked = [
        walk_files(folder, outside=dataset_dirs - {os.path.realpath(folder)}) for _split, _label, folder in class_dirs
    ]
    problems = [Problem(path, "not inside a class folder") for path in loose if looks_like_image(path)]
    ignored = sum(1 for path in loose if not looks_like_image(path))
    hidden = found_layout.hidden + sum(found.hidden for found in walked)
    problems += [problem for found in walked for problem in found.problems]
    # 2. the files to decode: the excluded ones and, with a subset, the ones not drawn left out
    jobs = [(split, label, path) for (split, label, _), found in zip(class_dirs, walked) for path in found.files]
    if exclude is not None:
        jobs, excluded = _leave_out(jobs, exclude, root)
        problems += excluded
    if subset is not None:
        jobs = _subset(jobs, subset, layout=layout, flat_splits=flat_splits, seed=subset_seed)
    # 3. decode-check every file, on every core
    records, unreadable, not_images = _check_files(
        root, jobs, max_pixels=max_pixels, workers=workers, progress=progress
    )
    problems += unreadable
    ignored += not_images
    # 4. the class list (from the training split) and what would stop training
    classes, warnings = _classes(root, layout, class_dirs, records, problems, labelled_only, blockers)
    for message in warnings:
        log.warning(message)
    if problems:
        log.warning("%d file(s) skipped; reasons are listed in problems.csv", len(problems))
    return ImageIndex(
        root=root,
        layout=layout,
        records=tuple(records),
        problems=tuple(sorted(problems, key=lambda p: str(p.path))),
        classes=classes,
        ignored_files=ignored,
        hidden_files=hidden,
        warnings=(*found_layout.notes, *warnings),
        errors=tuple(blockers.found),
    )


_Job = tuple[str | None, str, Path]  # (split, label, file) of one file to decode


def _leave_out(jobs: list[_Job], exclude: Exclusions, root: Path) -> tuple[list[_Job], list[Problem]]:
    """The jobs `exclude` does not list, and a problem for each one it does; a warning for listed files that are
    not among the jobs."""
    left_out = [os.path.realpath(job[2]) in exclude.paths for job in jobs]
    problems = [Problem(job[2], f"excluded: listed in {exclude.source}") for job, out in zip(jobs, left_out) if out]
    if sum(left_out) < len(exclude.paths):
        log.warning(
            "%d of the %d image(s) listed in %s are not in %s (already removed, or another folder)",
            len(exclude.paths) - sum(left_out),
            len(exclude.paths),
            exclude.source,
            root,
        )
    return [job for job, out in zip(jobs, left_out) if not out], problems


def _subset(jobs: list[_Job], subset: int, *, layout: str, flat_splits: int, seed: int) -> list[_Job]:
    """`subset` jobs of each (split, class) of a split layout, `subset * flat_splits` of each class of a flat one
    (for the split to share out), drawn with `seed` (`_draw_subset`)."""
    per_group = subset if layout == "split" else subset * flat_splits
    kept = _draw_subset(jobs, per_group, seed)
    log.info(
        "subset: %d image(s) per class%s; %d of %d files left out, not decoded",
        subset,
        " and split" if layout == "split" else f" and split ({per_group} per class before the split)",
        len(jobs) - len(kept),
        len(jobs),
    )
    return kept


def _classes(
    root: Path,
    layout: str,
    class_dirs: list[tuple[str | None, str, Path]],
    records: list[ImageRecord],
    problems: list[Problem],
    labelled_only: bool,
    blockers: Blockers,
) -> tuple[tuple[str, ...], list[str]]:
    """The class list and its warnings: every class found for a labelled folder to evaluate on (which must hold a
    readable image), the training split's otherwise (`_class_map`)."""
    if not labelled_only:
        return _class_map(root, layout, class_dirs, records, problems, blockers=blockers)
    if not records:
        raise DataError(f"no readable images in {root} (expected <class>/<image> folders)" + _first_problems(problems))
    return tuple(sorted({r.label for r in records})), []


def _check_files(
    root: Path, jobs: list[_Job], *, max_pixels: int, workers: int | None, progress: Progress
) -> tuple[list[ImageRecord], list[Problem], int]:
    """Decode-check every job in parallel: (the readable images' records, the problems, how many files were not
    images at all), each list in the jobs' order."""
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    ignored = 0
    with progress.task(f"Checking images in {root}", total=len(jobs)) as task:
        check = partial(_check_job, jobs, max_pixels=max_pixels)
        for outcome in map_indices(check, len(jobs), workers=workers or max(2, usable_cpus())):
            task.advance()
            if isinstance(outcome, ImageRecord):
                records.append(outcome)
            elif isinstance(outcome, Problem):
                problems.append(outcome)
            else:
                ignored += 1
    return records, problems, ignored


@dataclass(frozen=True)
class Exclusions:
    """Images to leave out of a run (`data.exclude`): real paths, and the file that listed them."""

    paths: frozenset[str]
    source: Path


def read_exclude_list(path: Path, root: Path) -> Exclusions:
    """The images a `data.exclude` file lists: a CSV with a `path` column (such as `label_issues.csv`, trimmed to
    the rows to drop) or plain text, one path per line (`#` starts a comment); paths absolute or relative to `root`.

    Raises:
        DataError: the file is missing or a CSV without a `path` column.
    """
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(
            f"exclude list not found: {path} (data.exclude: a CSV with a path column, or one path per line)"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    header = lines[0].split(",") if lines else []
    if path.suffix.lower() == ".csv" or "path" in (column.strip() for column in header):
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "path" not in rows[0]:
            raise DataError(f"{path}: expected a 'path' column; received columns {', '.join(rows[0])}")
        names = [row["path"].strip() for row in rows if (row.get("path") or "").strip()]
    else:
        names = lines
    resolved = frozenset(os.path.realpath(name if Path(name).is_absolute() else Path(root) / name) for name in names)
    return Exclusions(resolved, path)


def _check_job(jobs: list[tuple[str | None, str, Path]], index: int, *, max_pixels: int):
    return _check_file(*jobs[index], max_pixels=max_pixels)


def _check_file(split: str | None, label: str, path: Path, *, max_pixels: int) -> ImageRecord | Problem | None:
    """Decode and hash one file. None means "not an image and not named like one": ignored, not a problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Problem(path, f"cannot read file ({exc.strerror or exc})")
    if not data:
        return Problem(path, "empty file (0 bytes)") if looks_like_image(path) else None
    try:
        with open_image(data, max_pixels=max_pixels, name=str(path)) as image:
            width, height = image.size
            single = is_single_channel(image)
            if min(width, height) < MIN_SIDE:
                return Problem(path, f"too small: {width}x{height} px, the minimum side is {MIN_SIDE} px")
            image.load()
    except ImageError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        if "not an image" in reason and not looks_like_image(path):
            return None
        return Problem(path, reason)
    except (OSError, ValueError, SyntaxError) as exc:
        return Problem(path, f"cannot decode ({exc})")
    return ImageRecord(
        path=path,
        label=label,
        split=split,
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        single_channel=single,
    )


def _class_map(
    root: Path,
    layout: str,
    class_dirs: list[tuple[str | None, str, Path]],
    records: list[ImageRecord],
    problems: list[Problem],
    *,
    blockers: Blockers | None = None,
) -> tuple[tuple[str, ...], list[str]]:
    """The class list (from the training split) and warnings; what would stop training goes to `blockers`
    (raised at once by default). Collected, the class list is what training would use once those are fixed."""
    blockers = blockers or Blockers(collect=False)
    train_split = "train" if layout == "split" else None
    counts: dict[str | None, Counter[str]] = {}
    for record in records:
        counts.setdefault(record.split, Counter())[record.label] += 1
    train_counts = counts.get(train_split, Counter())
    if not train_counts:
        where = root / "train" if layout == "split" else root
        loose = [p for p in problems if p.reason == "not inside a class folder"]
        if loose and len(loose) == len(problems):
            blockers.add(
                where,
                f"no training images in {where}: its {len(loose)} image(s) lie directly in the folder, not in class "
                f"folders; put each class's images in a folder named after it ({where}/<class>/<image>)",
            )
        else:
            blockers.add(
                where,
                f"no training images in {where} (expected <class>/<image> folders; {len(problems)} file(s) skipped)"
                + _first_problems(problems),
            )
        return (), []
    empty = sorted({label for split, label, _ in class_dirs if split == train_split and not train_counts[label]})
    if empty:
        blockers.add(
            root / "train" if layout == "split" else root,
            f"class folder(s) with no readable image: {', '.join(empty)} in {root}; add images or remove the "
            "folder" + _first_problems([p for p in problems if any(part in empty for part in p.path.parts)]),
        )
    classes = tuple(sorted(train_counts))
    if len(classes) < 2:
        blockers.add(root, f"{root}: found {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2")
    warnings: list[str] = []
    for split in ("val", "test"):
        if layout != "split" or not any(s == split for s, _, _ in class_dirs):
            continue
        present = counts.get(split, Counter())
        unknown = sorted(set(present) - set(classes))
        if unknown:
            hints = [_near_match(label, classes) for label in unknown]
            blockers.add(
                next(folder.parent for s, _, folder in class_dirs if s == split),
                f"{split} split has class(es) not in train: {', '.join(unknown)}; every val/test class must "
                f"have training images (train classes: {', '.join(classes)})"
                + "".join(f"; {hint}" for hint in hints if hint),
            )
        missing = [label for label in classes if not present[label]]
        if missing:
            warnings.append(f"{split} split has no images of class(es): {', '.join(missing)}")
    return classes, warnings


def _near_match(label: str, classes: tuple[str, ...]) -> str | None:
    """Say how `label` differs from a train class that is the same name up to case, spaces or Unicode form."""
    for name in classes:
        for why, key in (
            ("Unicode normal form (NFC vs NFD)", lambda t: unicodedata.normalize("NFC", t)),
            ("surrounding spaces", str.strip),
            ("case", str.casefold),
            ("case, spaces or Unicode form", lambda t: unicodedata.normalize("NFC", t).strip().casefold()),
        ):
            if key(label) == key(name):
                return f"'{label}' differs from train's '{name}' only by {why}: rename one folder"
    return None


def _draw_subset(
    jobs: list[tuple[str | None, str, Path]], per_group: int, seed: int
) -> list[tuple[str | None, str, Path]]:
    """`per_group` files of each (split, class), drawn with `seed` from those named like images (all files when a
    group has no such name), in the jobs' order."""
    import random

    groups: dict[tuple[str | None, str], list[int]] = {}
    for index, (split, label, _path) in enumerate(jobs):
        groups.setdefault((split, label), []).append(index)
    chosen: set[int] = set()
    rng = random.Random(seed)
    for key in sorted(groups, key=lambda k: (k[0] or "", k[1])):
        indices = groups[key]
        named = [i for i in indices if looks_like_image(jobs[i][2])] or indices
        chosen.update(rng.sample(named, min(per_group, len(named))))
    return [job for index, job in enumerate(jobs) if index in chosen]


def _first_problems(problems: list[Problem], limit: int = 3) -> str:
    if not problems:
        return ""
    shown = "; ".join(f"{p.path}: {p.reason}" for p in problems[:limit])
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return f". Skipped: {shown}{more}"
