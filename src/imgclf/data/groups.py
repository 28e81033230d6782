"""Groups: images that must stay in one split because they share a source (frames of one video, photos of one
patient, one object photographed many times). A model tested on another photo of a training patient is partly
tested on memory, however different the pixels are.

A group comes from the image's path relative to the dataset folder, by a regular expression (`data.groups`, e.g.
`(?P<group>patient\\d+)`: its named group `group`, else its first group, else the whole match), or from a CSV file
(`data.groups_csv`: columns `path` and `group`, paths relative to the dataset folder or absolute). An image that
neither names is a group of its own. `data.split` keeps every group in one split; `group_spans` lists the groups
that a folder split by hand already spreads over several splits.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import ConfigError, DataError
from imgclf.files import read_csv

__all__ = ["GroupSpan", "compile_pattern", "find_groups", "group_spans"]

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("path", "group")


def find_groups(
    root: Path, paths: Iterable[Path], *, pattern: str | None = None, csv_file: Path | None = None
) -> dict[Path, str]:
    """The group of each image that has one, by `pattern` over its path relative to `root` or by `csv_file`.

    Args:
        root: the dataset folder the relative paths start from.
        paths: the images (absolute, or relative to the working directory as the scan found them).
        pattern: a regular expression searched in the relative path (POSIX separators).
        csv_file: a CSV with `path` and `group` columns; used together with `pattern`, the file wins.

    Returns:
        path -> group, for the images a rule names; the others are absent (each its own group).

    Raises:
        ConfigError: `pattern` is not a valid regular expression (exit 2).
        DataError: `csv_file` is missing or lacks its columns.

    Example:
        >>> find_groups(Path("scans"), [Path("scans/sick/patient07_a.png")], pattern=r"(?P<group>patient\\d+)")
        {PosixPath('scans/sick/patient07_a.png'): 'patient07'}
    """
    paths = [Path(p) for p in paths]
    found: dict[Path, str] = {}
    if pattern is not None:
        regex = compile_pattern(pattern)
        for path in paths:
            match = regex.search(_relative(path, root))
            if match is not None:
                found[path] = _group_of(match)
    if csv_file is not None:
        found.update(_groups_from_csv(Path(csv_file), root, paths))
    if (pattern is not None or csv_file is not None) and paths:
        alone = len(paths) - len(found)
        if alone:
            rule = f"data.groups {pattern!r}" if csv_file is None else f"{csv_file}"
            examples = ", ".join(_relative(p, root) for p in paths if p not in found)[:200]
            log.warning(
                "%d of %d image(s) belong to no group by %s (each is a group of its own): %s",
                alone,
                len(paths),
                rule,
                examples,
            )
    return found


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """`data.groups` compiled, or a ConfigError naming the key, what was expected and the regex error."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"data.groups must be a regular expression over the relative path, e.g. '(?P<group>patient\\d+)'; "
            f"received {pattern!r} ({exc})"
        ) from None


def _group_of(match: re.Match[str]) -> str:
    if "group" in match.re.groupindex:
        return match.group("group") or match.group(0)
    return (match.group(1) if match.re.groups else None) or match.group(0)


def _groups_from_csv(csv_file: Path, root: Path, paths: list[Path]) -> dict[Path, str]:
    try:
        rows = read_csv(csv_file)
    except FileNotFoundError:
        raise DataError(f"groups file not found: {csv_file} (data.groups_csv; expected columns path, group)") from None
    if rows and set(GROUP_COLUMNS) - set(rows[0]):
        raise DataError(
            f"{csv_file}: expected columns {', '.join(GROUP_COLUMNS)}; received {', '.join(map(str, rows[0]))}"
        )
    listed = {}
    for row in rows:
        name = (row.get("path") or "").strip()
        if name and (row.get("group") or "").strip():
            listed[Path(name).as_posix()] = row["group"].strip()
    found = {}
    for path in paths:
        key = _relative(path, root)
        group = listed.get(key) or listed.get(Path(path).resolve().as_posix()) or listed.get(Path(path).as_posix())
        if group is not None:
            found[path] = group
    return found


def _relative(path: Path, root: Path) -> str:
    for base in (Path(root), Path(root).resolve()):
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            continue
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


@dataclass(frozen=True)
class GroupSpan:
    """A group whose images sit in more than one split."""

    group: str
    splits: dict[str, int]  # split -> images of the group in it

    def describe(self) -> str:
        return f"{self.group} ({', '.join(f'{split} {count}' for split, count in self.splits.items())})"


def group_spans(splits_of: Iterable[tuple[Path, str]], groups: Mapping[Path, str]) -> list[GroupSpan]:
    """The groups that span splits, given (path, split) of every image: a folder split by hand that mixes them.

    Example:
        >>> splits_of = [(Path("train/sick/p07_a.png"), "train"), (Path("test/sick/p07_b.png"), "test")]
        >>> group_spans(splits_of, {path: "p07" for path, _ in splits_of})
        [GroupSpan(group='p07', splits={'train': 1, 'test': 1})]
    """
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path, split in splits_of:
        group = groups.get(Path(path))
        if group is not None:
            counts[group][split] += 1
    order = {"train": 0, "val": 1, "test": 2}
    return [
        GroupSpan(group, dict(sorted(splits.items(), key=lambda item: order.get(item[0], 3))))
        for group, splits in sorted(counts.items())
        if len(splits) > 1
    ]
