"""The layout of an image folder: split (`train/val/test/<class>`) or flat (`<class>/`), its class folders, and a
walk of the files below them that skips hidden entries and never follows a link twice; what the user passes to
`predict` (files, folders, globs) expanded the same way.

`imgclf.data.scan` decodes and hashes what this module finds.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imgclf.data.images import open_image
from imgclf.errors import DataError, ImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "SPLIT_FOLDER_NAMES",
    "Blockers",
    "FileWalk",
    "Layout",
    "Problem",
    "check_training_folder",
    "collect_inputs",
    "find_class_folders",
    "is_skipped",
    "looks_like_image",
    "walk_files",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".dib",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".ico",
        ".tga",
        ".jp2",
        ".j2k",
        ".heic",
        ".avif",
    ]
)
_SKIPPED_FOLDERS = frozenset({"__MACOSX", "__pycache__"})


@dataclass(frozen=True)
class Problem:
    """One skipped file and why; or, in `ImageIndex.errors`, a folder that would stop training and why."""

    path: Path
    reason: str


class Blockers:
    """What would stop training: raised at once (train), or collected and returned (inspect)."""

    def __init__(self, *, collect: bool) -> None:
        self.collect = collect
        self.found: list[Problem] = []

    def add(self, path: Path, message: str) -> None:
        if not self.collect:
            raise DataError(message)
        self.found.append(Problem(path, message))


@dataclass
class Layout:
    kind: Literal["split", "flat"]
    class_dirs: list[tuple[str | None, str, Path]]  # (split or None, class, folder)
    loose: list[Path]  # files lying outside any class folder
    hidden: int  # hidden entries at the root and split level
    notes: list[str] = field(default_factory=list)  # warnings about the layout (already logged)

    def dataset_dirs(self, root: Path) -> set[str]:
        """Real paths of the root, split and class folders: a symlink into one of them is not followed."""
        folders = [root, *(folder.parent for _, _, folder in self.class_dirs), *(f for _, _, f in self.class_dirs)]
        return {os.path.realpath(folder) for folder in folders}


def find_class_folders(root: Path, *, need_train: bool = True, blockers: Blockers | None = None) -> Layout:
    """Decide the layout and list the class folders. Collected `blockers` keep the first of two folders that
    name one split, and go on without a train folder."""
    blockers = blockers or Blockers(collect=False)
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    hidden = sum(1 for p in entries if is_skipped(p.name))
    folders = [p for p in entries if p.is_dir() and not is_skipped(p.name)]
    loose = [p for p in entries if not p.is_dir() and not is_skipped(p.name)]
    split_folders: dict[str, Path] = {}
    for folder in folders:
        split = SPLIT_FOLDER_NAMES.get(folder.name.lower())
        if split is None:
            continue
        if split in split_folders:
            blockers.add(
                folder,
                f"{root}: both '{split_folders[split].name}' and '{folder.name}' name the {split} split; keep one",
            )
            continue
        split_folders[split] = folder
    if not split_folders:
        return Layout("flat", [(None, folder.name, folder) for folder in folders], loose, hidden)
    if "train" not in split_folders and need_train:
        named = ", ".join(sorted(p.name for p in split_folders.values()))
        blockers.add(
            root, f"{root}: found split folder(s) {named} but no 'train' folder; add {root / 'train'}/<class>/"
        )
    notes = []
    others = [p.name for p in folders if p not in split_folders.values() and not SPLIT_FOLDER_NAMES.get(p.name.lower())]
    if others:
        notes.append(f"{root}: folders {', '.join(others)} are not train/val/test and are ignored")
        log.warning(notes[-1])
    class_dirs: list[tuple[str | None, str, Path]] = []
    for split in SPLITS:
        if split not in split_folders:
            continue
        for entry in sorted(split_folders[split].iterdir(), key=lambda p: p.name):
            if is_skipped(entry.name):
                hidden += 1
            elif entry.is_dir():
                class_dirs.append((split, entry.name, entry))
            else:
                loose.append(entry)
    return Layout("split", class_dirs, loose, hidden, notes)


@dataclass
class FileWalk:
    files: list[Path]
    problems: list[Problem]
    hidden: int


def walk_files(folder: Path, *, outside: set[str] | frozenset[str] = frozenset()) -> FileWalk:
    """Every non-hidden file below `folder`, sorted, following folder symlinks.

    A folder reached twice (a symlink loop, or a second link to the same folder) is walked once and the
    link reported; so is a link into `outside` (real paths of folders that belong to other classes, whose
    images would otherwise be counted under the wrong label).
    """
    found = FileWalk(files=[], problems=[], hidden=0)
    seen_dirs: set[str] = set(outside)

    def on_error(error: OSError) -> None:
        found.problems.append(Problem(Path(error.filename or folder), f"cannot list folder ({error.strerror})"))

    for current, dirnames, filenames in os.walk(folder, followlinks=True, onerror=on_error):
        real = os.path.realpath(current)
        if real in seen_dirs:
            found.problems.append(
                Problem(
                    Path(current), "link to a folder already in the dataset (a loop or a second link); not followed"
                )
            )
            dirnames.clear()
            continue
        seen_dirs.add(real)
        kept = []
        for name in sorted(dirnames):
            if is_skipped(name):
                found.hidden += 1
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(current) / name
            if is_skipped(name):
                found.hidden += 1
            elif path.is_symlink() and not path.exists():
                found.problems.append(Problem(path, "dangling symlink (its target does not exist)"))
            else:
                found.files.append(path)
    return found


def check_training_folder(root: Path) -> None:
    """Catch the usual first mistakes with a folder given to `train`, before any work, with what to do instead.

    Raises:
        ConfigError: (exit 2) the folder is a run folder; the `train/` split of a split folder (which would be
            re-split as a flat folder, its val/ and test/ unused); images with no class folders; split folders
            without `train/`.
    """
    from imgclf.errors import ConfigError

    root = Path(root)
    if not root.is_dir():
        return  # the scan says it is missing
    if (root / "config.yaml").is_file() and (root / "manifest.csv").is_file():
        raise ConfigError(
            f"{root} is a run folder, not a dataset: continue it with `imgclf train --resume {root}`, evaluate it "
            f"with `imgclf evaluate {root}`, or train on the data it came from (its env.json names it)"
        )
    entries = [p for p in root.iterdir() if not is_skipped(p.name)]
    split_of = SPLIT_FOLDER_NAMES.get(root.name.lower())
    if split_of is not None:
        siblings = [
            p.name for p in root.parent.iterdir() if p.is_dir() and p != root and p.name.lower() in SPLIT_FOLDER_NAMES
        ]
        if siblings:
            raise ConfigError(
                f"{root} is the {split_of} split of {root.parent} (beside {', '.join(sorted(siblings))}/): pass "
                f"{root.parent} itself; given {root.name}/ alone, imgclf would split it again and never use "
                f"{', '.join(sorted(siblings))}/"
            )
    folders = [p for p in entries if p.is_dir()]
    images = [p for p in entries if p.is_file() and looks_like_image(p)]
    if images and not folders:
        raise ConfigError(
            f"{root} holds {len(images)} image(s) but no class folders: imgclf learns the classes from folder names; "
            f"put each class's images in a folder named after it ({root}/cat/, {root}/dog/, ...)"
        )
    splits = {SPLIT_FOLDER_NAMES[p.name.lower()] for p in folders if p.name.lower() in SPLIT_FOLDER_NAMES}
    if splits and "train" not in splits:
        raise ConfigError(
            f"{root} has {', '.join(sorted(splits))}/ but no train/: the classes and the model come from "
            f"{root}/train/<class>/; add it (or pass a flat folder of class folders, which is split for you)"
        )


def is_skipped(name: str) -> bool:
    return name.startswith(".") or name in _SKIPPED_FOLDERS


def looks_like_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files, folders (recursively; image files by extension or content) and glob patterns, in order.

    A path that does not exist and matches nothing is kept, so that its prediction row reports the error.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [p for p in walk_files(path).files if looks_like_image(p) or _sniff(p)]
        elif path.exists():
            found.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True))
            found += [Path(m) for m in matches if Path(m).is_file()]
            if not matches:
                log.warning("pattern %s matched no files", item)
        else:
            found.append(path)
    return found


def _sniff(path: Path) -> bool:
    try:
        with open_image(path):
            return True
    except (ImageError, OSError):
        return False
