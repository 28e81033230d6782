"""Seeded, stratified train/val/test splits, the manifest that records them, and the leak report.

A folder that is already split keeps its split (val is carved out of train when it has no val folder). A flat
folder is split per class: each split's count is the class size times its ratio, rounded (so within one image),
except that every class with at least 3 images gets at least one image in every split, which takes precedence
for very small classes (4 images at 0.8/0.1/0.1 give 2/1/1). What must not be split stays together: identical files
(same sha256), near-duplicates (`data.duplicates`) and images of one group (`data.groups`) form one unit, and units
are what is shared out (counted as units, as scikit-learn's GroupShuffleSplit counts groups), each in the stratum of
its most common class. A split made here never leaks a duplicate or a group; duplicates and groups across the splits
of a folder split by hand are reported with their pairs.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from imgclf.data.duplicates import find_near_duplicates, units
from imgclf.data.groups import GroupSpan, find_groups, group_spans
from imgclf.data.layout import SPLITS
from imgclf.data.leaks import Duplicate, find_duplicates
from imgclf.data.scan import ImageIndex, ImageRecord, read_exclude_list, scan_folder
from imgclf.errors import DataError
from imgclf.files import read_csv, write_csv_atomic
from imgclf.progress import NO_PROGRESS, Progress

__all__ = [
    "LinkMode",
    "ManifestDifference",
    "ManifestRow",
    "SplitData",
    "SplitManifest",
    "compare_manifests",
    "make_manifest",
    "materialize_split",
    "scan_and_split",
    "stratified_split",
]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "split", "sha256")
LinkMode = Literal["hardlink", "copy", "symlink"]


@dataclass(frozen=True)
class ManifestRow:
    path: Path
    label: str
    split: str
    sha256: str


@dataclass(frozen=True)
class SplitManifest:
    """Every image used by a run with its class and split. The class list comes from the train rows."""

    rows: tuple[ManifestRow, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted({row.label for row in self.rows if row.split == "train"}))

    def split(self, name: str) -> list[ManifestRow]:
        return [row for row in self.rows if row.split == name]

    def counts(self) -> dict[str, Counter[str]]:
        """Images per class for each split."""
        result: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
        for row in self.rows:
            result[row.split][row.label] += 1
        return result

    def save(self, path: Path) -> None:
        rows = ((str(r.path), r.label, r.split, r.sha256) for r in self.rows)
        write_csv_atomic(path, MANIFEST_COLUMNS, rows)

    @classmethod
    def load(cls, path: Path) -> SplitManifest:
        try:
            rows = read_csv(path)
        except FileNotFoundError:
            raise DataError(f"manifest not found: {path}") from None
        if rows and set(MANIFEST_COLUMNS) - set(rows[0]):
            raise DataError(f"{path}: expected columns {', '.join(MANIFEST_COLUMNS)}; received {', '.join(rows[0])}")
        return cls(tuple(ManifestRow(Path(r["path"]), r["label"], r["split"], r["sha256"]) for r in rows))


@dataclass(frozen=True)
class ManifestDifference:
    """How a folder's images differ from the ones a manifest recorded, by path relative to each data root."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # same path, other content (sha256) or another class
    moved: tuple[str, ...]  # same file, another split

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.moved)

    def describe(self, shown: int = 5) -> str:
        """'2 added (a.png, b.png); 1 changed (c.png)', naming at most `shown` files per kind."""
        parts = []
        for kind, names in (
            ("added", self.added),
            ("removed", self.removed),
            ("changed", self.changed),
            ("in another split", self.moved),
        ):
            if names:
                more = f", and {len(names) - shown} more" if len(names) > shown else ""
                parts.append(f"{len(names)} {kind} ({', '.join(names[:shown])}{more})")
        return "; ".join(parts)


def compare_manifests(
    recorded: SplitManifest, recorded_root: Path, current: SplitManifest, current_root: Path
) -> ManifestDifference:
    """What differs between the images a run recorded (under `recorded_root`) and a fresh scan of a folder (under
    `current_root`): files added, removed, changed in content or class, or assigned to another split."""

    def keyed(manifest: SplitManifest, root: Path) -> dict[str, ManifestRow]:
        return {_relative(row.path, root): row for row in manifest.rows}

    before, after = keyed(recorded, Path(recorded_root)), keyed(current, Path(current_root))
    common = sorted(set(before) & set(after))
    return ManifestDifference(
        added=tuple(sorted(set(after) - set(before))),
        removed=tuple(sorted(set(before) - set(after))),
        changed=tuple(
            name
            for name in common
            if (before[name].sha256, before[name].label) != (after[name].sha256, after[name].label)
        ),
        moved=tuple(
            name
            for name in common
            if before[name].sha256 == after[name].sha256 and before[name].split != after[name].split
        ),
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


@dataclass(frozen=True)
class SplitData:
    """A folder scanned and split, with what keeps the split honest: the duplicates that cross splits or labels (for
    duplicates.csv), the groups found, and the groups a folder split by hand spreads over several splits."""

    index: ImageIndex
    manifest: SplitManifest
    duplicates: tuple[Duplicate, ...] = ()
    groups: dict[Path, str] = field(default_factory=dict)
    spans: tuple[GroupSpan, ...] = ()
    near: tuple[tuple[Path, Path, float, str], ...] = ()  # every near-duplicate pair, whichever splits


def scan_and_split(
    root: Path,
    *,
    ratios: Sequence[float],
    seed: int,
    max_pixels: int,
    subset: int | None = None,
    collect_errors: bool = False,
    near_duplicates: bool = True,
    groups: str | None = None,
    groups_csv: Path | None = None,
    exclude: Path | None = None,
    cache_dir: Path | None = None,
    progress: Progress = NO_PROGRESS,
) -> SplitData:
    """Scan a dataset folder and split it, as `train` does (and `inspect`, to show what train would see).

    With `subset`, only `subset` images per class and split are drawn (with `seed`) and decoded; a flat folder's
    subset is shared out `subset` per split (every split with a share in `ratios` gets the same count).

    Args:
        root: the dataset folder.
        ratios, seed, max_pixels, subset: as `data.split_ratios`, `data.split_seed`, `data.max_pixels`, `data.subset`.
        collect_errors: list what would stop training instead of raising it (`scan_folder`).
        near_duplicates: also find near-duplicates (`data.duplicates`), keep them together and report them.
        groups, groups_csv: `data.groups` / `data.groups_csv` (`data.groups`): a group never spans two splits.
        exclude: `data.exclude`, a list of images to leave out (`read_exclude_list`).
        cache_dir: where the near-duplicate features are cached (as `data.cache_dir`).
        progress: reporter for the decode checks and the near-duplicate features.
    """
    shares = [ratio > 0 for ratio in ratios]
    index = scan_folder(
        root,
        max_pixels=max_pixels,
        subset=subset,
        subset_seed=seed,
        flat_splits=sum(shares),
        collect_errors=collect_errors,
        exclude=read_exclude_list(exclude, root) if exclude is not None else None,
        progress=progress,
    )
    if subset is not None and index.layout == "flat":
        ratios = tuple(share / sum(shares) for share in shares)
    paths = [record.path for record in index.records]
    near = (
        find_near_duplicates(
            paths,
            [record.sha256 for record in index.records],
            [min(record.width, record.height) for record in index.records],
            max_pixels=max_pixels,
            cache_dir=cache_dir,
            progress=progress,
        ).pairs
        if near_duplicates
        else ()
    )
    found_groups = find_groups(root, paths, pattern=groups, csv_file=groups_csv) if groups or groups_csv else {}
    manifest = make_manifest(
        index,
        ratios=ratios,
        seed=seed,
        units=dict(zip(paths, units(paths, [r.sha256 for r in index.records], near, found_groups).tolist())),
    )
    spans = group_spans(((row.path, row.split) for row in manifest.rows), found_groups) if found_groups else []
    for span in spans[:5]:
        log.warning("group %s spans splits made by hand: its images are in %s", span.group, span.describe())
    return SplitData(index, manifest, tuple(find_duplicates(manifest, near)), found_groups, tuple(spans), tuple(near))


def make_manifest(
    index: ImageIndex, *, ratios: Sequence[float], seed: int, units: Mapping[Path, int] | None = None
) -> SplitManifest:
    """Assign every scanned image to train, val or test.

    Args:
        index: the scan result.
        ratios: train/val/test fractions for a flat folder; a split folder without val gets
            val = ratios[1] / (ratios[0] + ratios[1]) of its train images.
        seed: seed of the shuffle; the same seed always gives the same split.
        units: path -> unit (`data.duplicates.units`: identical files, near-duplicates, groups) kept in one split;
            default identical files of one class.

    Returns:
        The manifest, rows sorted by split, class and path.

    Raises:
        DataError: keeping the units together leaves a class without training images.

    Example:
        >>> make_manifest(scan_folder(Path("photos")), ratios=(0.8, 0.1, 0.1), seed=0).counts()["val"]
        Counter({'digit0': 3, 'digit1': 3, 'digit2': 3})
    """
    if index.layout == "flat":
        assigned = stratified_split(index.records, ratios, seed, units=units)
    else:
        assigned = {record.path: record.split or "train" for record in index.records}
        if not any(record.split == "val" for record in index.records):
            val_share = ratios[1] / (ratios[0] + ratios[1])
            train = [record for record in index.records if record.split == "train"]
            assigned.update(stratified_split(train, (1 - val_share, val_share, 0.0), seed, units=units))
            log.info("no val folder: %.0f%% of each training class is held out for validation", 100 * val_share)
    rows = [ManifestRow(r.path, r.label, assigned[r.path], r.sha256) for r in index.records]
    order = {name: i for i, name in enumerate(SPLITS)}
    rows.sort(key=lambda r: (order[r.split], r.label, str(r.path)))
    manifest = SplitManifest(tuple(rows))
    if units is not None:
        _check_training_classes(index, manifest)
    return manifest


def _check_training_classes(index: ImageIndex, manifest: SplitManifest) -> None:
    """Units spanning classes can take every image of a small class out of training: say so, by name."""
    trained = set(manifest.classes)
    lost = [name for name in index.classes if name not in trained]
    if lost:
        raise DataError(
            f"class(es) {', '.join(lost)} have no training images once duplicates and groups are kept together: "
            "their images share groups (data.groups) or near-duplicates with images of other classes that went to "
            "val/test; check the groups, or pass a folder split by hand"
        )


def stratified_split(
    records: Sequence[ImageRecord], ratios: Sequence[float], seed: int, units: Mapping[Path, int] | None = None
) -> dict[Path, str]:
    """Per-class seeded split of `records` into train/val/test by `ratios`; returns path -> split.

    The units shared out are `units` (path -> unit; images of a unit go to one split), by default the identical files
    of each class. A unit belongs to the stratum of its most common class and counts as one in it.
    """
    rng = np.random.default_rng(seed)
    unit_of = units if units is not None else {record.path: (record.label, record.sha256) for record in records}
    members: dict[object, list[ImageRecord]] = defaultdict(list)
    for record in records:
        members[unit_of[record.path]].append(record)
    by_class: dict[str, list[list[ImageRecord]]] = defaultdict(list)
    for group in members.values():
        labels = Counter(record.label for record in group)
        by_class[min(labels, key=lambda label: (-labels[label], label))].append(group)
    assigned: dict[Path, str] = {}
    for label in sorted(by_class):
        groups = sorted(by_class[label], key=lambda group: min(record.sha256 for record in group))
        order = rng.permutation(len(groups))
        n_val, n_test = _split_sizes(len(groups), ratios)
        for rank, group_index in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            for record in groups[group_index]:
                assigned[record.path] = split
    return assigned


def _split_sizes(n: int, ratios: Sequence[float]) -> tuple[int, int]:
    """(n_val, n_test) for a class of n items: rounded shares, at least one each when n >= 3, train keeps >= 1."""
    _, val_ratio, test_ratio = ratios
    n_val, n_test = round(n * val_ratio), round(n * test_ratio)
    if n >= 3:
        n_val = max(n_val, 1 if val_ratio > 0 else 0)
        n_test = max(n_test, 1 if test_ratio > 0 else 0)
    elif n == 2:
        n_val, n_test = (1, 0) if val_ratio > 0 else (0, 1 if test_ratio > 0 else 0)
    else:
        n_val = n_test = 0
    while n_val + n_test > n - 1:  # keep at least one training image
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def materialize_split(manifest: SplitManifest, target: Path, *, mode: LinkMode = "hardlink") -> dict[str, int]:
    """Write the split as `target/{train,val,test}/<class>/<file>` without touching the source files.

    The tree is built in a hidden folder beside `target` and renamed into place when complete, so a failure
    leaves no half-written target.

    Args:
        manifest: what goes where.
        target: a folder that does not exist yet or is empty.
        mode: "hardlink" (default; copies when the target is on another file system), "copy" or "symlink".

    Returns:
        Number of files written per split.

    Raises:
        DataError: the target exists and is not empty, or a source file cannot be read.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"target {target} exists and is not empty; choose a new folder (nothing was written)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    written: Counter[str] = Counter()
    can_link = mode == "hardlink"
    try:
        for row in manifest.rows:
            folder = staging / row.split / row.label
            folder.mkdir(parents=True, exist_ok=True)
            destination = _free_name(folder / row.path.name)
            source = row.path.resolve()
            if mode == "symlink":
                destination.symlink_to(source)
            elif can_link:
                try:
                    os.link(source, destination)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    log.warning("hard links are not possible here (%s); copying instead", exc.strerror)
                    can_link = False
                    shutil.copy2(source, destination)
            else:
                shutil.copy2(source, destination)
            written[row.split] += 1
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"cannot write the split to {target}: {exc} (nothing was written)") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dict(written)


def _free_name(path: Path) -> Path:
    """`path`, or `stem-1.ext`, `stem-2.ext`, ... when files from nested folders share a name."""
    candidate, n = path, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
