"""`duplicates.csv`: pairs of identical files (same sha256) and near-duplicates (`data.duplicates`) that sit in
two splits (a leak: the test score partly measures memory) or under two labels (a conflict), with the distance and
the method that found each; written by `inspect` and `train`, read by the report and the diagnosis.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.files import read_csv, write_csv_atomic

if TYPE_CHECKING:
    from imgclf.data.split import ManifestRow, SplitManifest

__all__ = [
    "DUPLICATE_COLUMNS",
    "Duplicate",
    "find_duplicates",
    "read_duplicates",
    "save_duplicates",
    "warn_about_duplicates",
]

log = logging.getLogger(__name__)


DUPLICATE_COLUMNS = (
    "kind",
    "issue",
    "distance",
    "method",
    "path_a",
    "split_a",
    "label_a",
    "path_b",
    "split_b",
    "label_b",
)


@dataclass(frozen=True)
class Duplicate:
    """Two images with the same content (exact: same sha256; near: the same picture saved again) in different
    splits (a leak) or with different labels (a conflict)."""

    first: ManifestRow
    second: ManifestRow
    kind: str = "exact"  # exact | near
    distance: float = 0.0  # 1 - similarity of the thumbnails (0 for identical files)
    method: str = "sha256"  # sha256 | phash | thumbnail | aligned

    @property
    def issue(self) -> str:
        return "label conflict" if self.first.label != self.second.label else "leak across splits"

    @property
    def sha256(self) -> str:
        return self.first.sha256


def find_duplicates(manifest: SplitManifest, near: Sequence[tuple[Path, Path, float, str]] = ()) -> list[Duplicate]:
    """Identical files, and the `near` pairs (`find_near_duplicates(...).pairs`), that sit in different splits or
    under different labels. A group of identical files is reported as a star of pairs around its first file (linear
    in the group size); near pairs as they were found, each with its distance."""
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in manifest.rows:
        groups[row.sha256].append(row)
    found = []
    for rows in groups.values():
        first = rows[0]
        found += [Duplicate(first, other) for other in rows[1:] if _apart(first, other)]
    by_path = {Path(row.path): row for row in manifest.rows}
    for path_a, path_b, similarity, method in near:
        first, second = by_path.get(Path(path_a)), by_path.get(Path(path_b))
        if first is None or second is None or first.sha256 == second.sha256 or not _apart(first, second):
            continue
        found.append(Duplicate(first, second, "near", round(1.0 - similarity, 6), method))
    return found


def _apart(first: ManifestRow, second: ManifestRow) -> bool:
    return first.split != second.split or first.label != second.label


def save_duplicates(duplicates: Sequence[Duplicate], path: Path) -> None:
    """`duplicates.csv`: kind (exact | near), issue (leak across splits | label conflict), distance, method, and both
    images' path, split and label."""
    rows = (
        (
            d.kind,
            d.issue,
            f"{d.distance:.4f}",
            d.method,
            d.first.path,
            d.first.split,
            d.first.label,
            d.second.path,
            d.second.split,
            d.second.label,
        )
        for d in duplicates
    )
    write_csv_atomic(path, DUPLICATE_COLUMNS, rows)


def read_duplicates(path: Path | str) -> list[dict[str, str]]:
    """The rows of a `duplicates.csv` ([] when absent), in this version's columns: files written by older versions
    (kind = the issue, identical files only) are read as exact duplicates."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = read_csv(path)
    for row in rows:
        if "issue" not in row:
            row.update(issue=row.get("kind", ""), kind="exact", distance="0", method="sha256")
    return rows


def warn_about_duplicates(duplicates: Sequence[Duplicate], limit: int = 5) -> None:
    if not duplicates:
        return
    shown = "; ".join(
        f"{d.first.path} ({d.first.split}/{d.first.label}) "
        f"{'=' if d.kind == 'exact' else '≈'} {d.second.path} ({d.second.split}/{d.second.label})"
        for d in duplicates[:limit]
    )
    more = f" and {len(duplicates) - limit} more" if len(duplicates) > limit else ""
    near = sum(d.kind == "near" for d in duplicates)
    log.warning(
        "%d duplicate image pair(s) across splits or labels (%d identical, %d near-duplicates; leaks inflate test "
        "accuracy): %s%s",
        len(duplicates),
        len(duplicates) - near,
        near,
        shown,
        more,
    )
