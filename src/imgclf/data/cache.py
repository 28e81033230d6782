"""Decode once: every image of a split as one uint8 array at the training resolution, reused across epochs
and runs.

Each image goes through the project's decoder (`data.images.load_image`) and the first, deterministic step of
the eval preprocessing: resize the shorter side to S = floor(img_size / crop_pct), center-crop S x S. Eval
then only center-crops `img_size` (exactly the tensor streaming gives); training crops, flips and rotates whole
batches (`data.batch_transforms`). The array is a `.npy` file under the cache folder, named by a fingerprint of
the files (path, size, mtime, sha256) and of the preprocessing, so any change to either builds a new one.
Builders take a file lock and publish by renaming a complete folder: two processes never see half a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from imgclf.data.images import load_image
from imgclf.data.parallel import map_indices
from imgclf.data.preprocessing import Preprocessing, chw_array, resize_shorter
from imgclf.errors import DataError, ImageError
from imgclf.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:  # torch is imported where a tensor is made: `imgclf cache list` answers without it
    import torch

__all__ = [
    "CacheEntry",
    "DecodedImages",
    "as_tensor",
    "cache_bytes",
    "cache_side",
    "cached_arrays",
    "choose_mode",
    "clear_cache",
    "content_key",
    "decoded_images",
    "default_cache_dir",
    "fingerprint",
    "list_cache",
    "stored_square",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES = "images.npy"  # a decoded-image cache
ARRAYS = "arrays.npz"  # per-image features (`cached_arrays`)
CacheMode = Literal["auto", "memory", "disk", "off"]


@dataclass(frozen=True)
class DecodedImages:
    """A split decoded to uint8 [N, C, S, S], and whether this call had to build it."""

    array: np.ndarray
    side: int
    built: bool
    location: Path | None  # None for an in-memory cache
    failed: list[tuple[int, str]] = field(default_factory=list)  # (row, reason): unreadable since the scan


def default_cache_dir() -> Path:
    """$IMGCLF_CACHE_DIR, else $XDG_CACHE_HOME/imgclf, else ~/.cache/imgclf."""
    explicit = os.environ.get("IMGCLF_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgclf"


def cache_side(pre: Preprocessing) -> int:
    """Side of the stored squares: the size eval preprocessing resizes to before its center crop."""
    return pre.resize_to


def stored_square(image: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """The uint8 [C, S, S] tensor the cache stores for one decoded image (S = `cache_side`).

    It is the S x S square around the pixels eval keeps: eval's center crop of img_size lands on the same pixels
    as a direct center crop of the resized image (the two roundings can differ by one). The resize is eval's own
    (`preprocessing.resize_shorter`, a no-op when the shorter side already is S).
    """
    import torch

    side = cache_side(pre)
    resized = chw_array(resize_shorter(image, side, pre.interpolation))
    height, width = resized.shape[-2:]
    top = round((height - pre.img_size) / 2.0) - round((side - pre.img_size) / 2.0)
    left = round((width - pre.img_size) / 2.0) - round((side - pre.img_size) / 2.0)
    return torch.from_numpy(resized[:, top : top + side, left : left + side].copy())


def cache_bytes(count: int, pre: Preprocessing) -> int:
    return count * pre.in_chans * cache_side(pre) ** 2


def choose_mode(mode: CacheMode, count: int, pre: Preprocessing, budget_fraction: float) -> CacheMode:
    """Resolve `auto`: cache on disk when the array fits `budget_fraction` of this machine's memory, else stream."""
    if mode != "auto":
        return mode
    need = cache_bytes(count, pre)
    budget = budget_fraction * _physical_memory()
    if need <= budget:
        return "disk"
    log.info(
        "not caching: %.1f GB of decoded images exceed the cache budget of %.1f GB (data.cache_budget)",
        need / 1e9,
        budget / 1e9,
    )
    return "off"


def decoded_images(
    paths: Sequence[Path],
    sha256: Sequence[str],
    pre: Preprocessing,
    *,
    mode: Literal["memory", "disk"],
    cache_dir: Path | None = None,
    max_pixels: int,
    progress: Progress = NO_PROGRESS,
    threads: int | None = None,
) -> DecodedImages:
    """The decoded array for these files: read from the disk cache when it exists, else built (and stored).

    Args:
        paths: the images, in the order the array will hold them.
        sha256: their content hashes (from the manifest), part of the fingerprint.
        pre: the preprocessing (size, crop, colour, interpolation).
        mode: "memory" (build in RAM, not stored) or "disk" (memmap under `cache_dir`, reused).
        cache_dir: where disk caches live; default `default_cache_dir()`.
        max_pixels: the decoder's pixel limit.
        progress: reporter for the build.
        threads: decoding processes (large jobs, Linux) or threads; default one per core.

    Returns:
        The array and whether it was built by this call.

    Raises:
        DataError: an image cannot be decoded any more (changed or removed since the scan).

    Example:
        >>> from imgclf.data.scan import scan_folder
        >>> records = scan_folder(Path("data")).records
        >>> paths, hashes = [record.path for record in records], [record.sha256 for record in records]
        >>> pre = Preprocessing.default_for(28, "gray")
        >>> decoded_images(paths, hashes, pre, mode="disk", max_pixels=50_000_000).array.shape
        (90, 1, 28, 28)
    """
    side = cache_side(pre)
    if mode == "memory":
        shape = (len(paths), pre.in_chans, side, side)
        # shared anonymous memory: forked decoding workers write their rows straight into it
        array = np.frombuffer(mmap.mmap(-1, max(1, math.prod(shape))), dtype=np.uint8)[: math.prod(shape)]
        array = array.reshape(shape)
        failed = _decode_into(array, paths, pre, max_pixels, progress, threads)
        return DecodedImages(array, side, built=True, location=None, failed=failed)

    folder = Path(cache_dir or default_cache_dir())
    key = fingerprint(paths, sha256, pre)
    target = folder / key
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{key}.lock")):
        if not _complete(target):
            _build(target, paths, pre, max_pixels, progress, threads)
            built = True
        else:
            built = False
            log.info("using the decoded-image cache %s", target)
            _touch(target / "meta.json")  # its mtime is the cache's "last used" (`imgclf cache list`)
        meta = json.loads((target / "meta.json").read_text(encoding="utf-8"))
        array = np.load(target / IMAGES, mmap_mode="r")  # under the lock: `imgclf cache clear` waits
    if array.shape != (len(paths), pre.in_chans, side, side):
        raise DataError(f"decoded-image cache {target} has shape {array.shape}; delete the folder to rebuild it")
    failed = [(int(index), reason) for index, reason in meta.get("failed", [])]
    return DecodedImages(array, side, built=built, location=target, failed=failed)


def fingerprint(paths: Sequence[Path], sha256: Sequence[str], pre: Preprocessing) -> str:
    """Changes when any file's path, size, mtime or content changes, or when the stored preprocessing does."""
    return content_key(paths, sha256, [FORMAT_VERSION, cache_side(pre), pre.color, pre.interpolation])


def content_key(paths: Sequence[Path], sha256: Sequence[str], settings: object) -> str:
    """The cache key of anything computed from these files with these (JSON-able) settings: it changes when any
    file's path, size, mtime or content changes, or the settings do. The decoded-image cache and the per-image
    features of `data.duplicates` and `evaluation.label_issues` are keyed by it."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings).encode())
    for path, content in zip(paths, sha256, strict=True):
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # gone since the scan: the build records it as a failure; its return changes the key
            size, mtime = -1, -1
        digest.update(f"{path}\0{size}\0{mtime}\0{content}\n".encode())
    return digest.hexdigest()[:32]


def _complete(target: Path) -> bool:
    return (target / "meta.json").is_file() and any((target / name).is_file() for name in (IMAGES, ARRAYS))


def cached_arrays(
    kind: str,
    key: str,
    build: Callable[[], dict[str, np.ndarray]],
    *,
    cache_dir: Path | None = None,
    source: str | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """Arrays computed once from a set of files and kept beside the decoded-image caches, under the same lock and
    publish-by-rename rules: `build()` runs only when no complete entry for `key` (a `content_key`) exists.

    Args:
        kind: what the arrays are, as `imgclf cache list` shows it ("near-duplicate features", ...).
        key: the entry's name, a `content_key` of the files and the settings the arrays depend on.
        build: computes the arrays (called under the entry's lock).
        cache_dir: the cache folder; default `default_cache_dir()`.
        source: the folder the files came from (shown by `imgclf cache list`).

    Returns:
        The arrays (loaded into memory) and whether this call built them.

    Example:
        >>> key = content_key([Path("a.png")], ["0" * 64], {"features": "zeros"})
        >>> arrays, built = cached_arrays("features", key, lambda: {"x": np.zeros(3)}, cache_dir=Path("cache"))
        >>> arrays["x"].shape, built, cached_arrays("features", key, lambda: {}, cache_dir=Path("cache"))[1]
        ((3,), True, False)
    """
    folder = Path(cache_dir or default_cache_dir())
    target = folder / key
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{key}.lock")):
        built = not _complete(target)
        if built:
            arrays = build()
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
            try:
                np.savez(staging / ARRAYS, **arrays)
                count = len(next(iter(arrays.values()))) if arrays else 0
                meta = {"version": FORMAT_VERSION, "kind": kind, "count": count, "source": source}
                (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
                if target.exists():  # an incomplete folder left by a killed builder
                    shutil.rmtree(target)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            _touch(target / "meta.json")
            with np.load(target / ARRAYS) as stored:
                arrays = {name: stored[name] for name in stored.files}
    return arrays, built


def _build(target: Path, paths, pre, max_pixels, progress, threads) -> None:
    side = cache_side(pre)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        array = np.lib.format.open_memmap(
            staging / IMAGES, mode="w+", dtype=np.uint8, shape=(len(paths), pre.in_chans, side, side)
        )
        failed = _decode_into(array, paths, pre, max_pixels, progress, threads)
        array.flush()
        del array
        meta = {
            "version": FORMAT_VERSION,
            "count": len(paths),
            "side": side,
            "preprocessing": pre.to_dict(),
            "failed": failed,
            "source": _common_folder(paths),  # what the cache is for, in `imgclf cache list`
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if target.exists():  # an incomplete folder left by a killed builder
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("decoded %d images once into %s (%.1f MB)", len(paths), target, len(paths) * pre.in_chans * side**2 / 1e6)


def _decode_into(
    array: np.ndarray, paths, pre: Preprocessing, max_pixels: int, progress: Progress, threads
) -> list[tuple[int, str]]:
    """Decode every image into its row; returns the rows that could not be decoded (left black) and why."""

    def decode(index: int) -> str | None:
        try:
            image = load_image(paths[index], color=pre.color, max_pixels=max_pixels)
        except (ImageError, OSError) as exc:
            return f"{exc} (changed or removed since the scan)"
        array[index] = stored_square(image, pre).numpy()
        return None

    with progress.task("Decoding images once", total=len(paths)) as task:
        failed = []
        for index, problem in enumerate(map_indices(decode, len(paths), workers=threads)):
            task.advance()
            if problem is not None:
                failed.append((index, problem))
    return failed


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (memmapped) uint8 array without copying it."""
    import torch

    return torch.from_numpy(np.asarray(array))


# --- housekeeping: `imgclf cache list` and `imgclf cache clear` ---------------------------------------------------

# What a cache folder holds: `<key>/` (images.npy or arrays.npz, + meta.json), `<key>.lock`, and `.<key>.<random>/`
# while a build runs (left behind when one is killed). Nothing else in the folder is ever touched, so a cache folder
# set by mistake to a folder of other files loses none of them.
_ENTRY = re.compile(r"(?P<key>[0-9a-f]{32})")
_STAGING = re.compile(r"\.(?P<key>[0-9a-f]{32})\.[A-Za-z0-9_]+")


@dataclass(frozen=True)
class CacheEntry:
    """One decoded-image cache (or an unfinished build of one) in a cache folder."""

    path: Path
    key: str
    size_bytes: int
    last_used: float  # POSIX time of the last build or reuse
    complete: bool  # False: a build in progress, or the staging folder of one that was killed
    images: int | None = None
    side: int | None = None  # stored squares are side x side pixels
    color: str | None = None
    source: str | None = None  # the folder the images came from (None for caches built before imgclf recorded it)
    kind: str = "decoded images"  # or what `cached_arrays` entries hold: "near-duplicate features", ...


def list_cache(cache_dir: Path | None = None) -> list[CacheEntry]:
    """The decoded-image caches in `cache_dir` (default `default_cache_dir()`), most recently used first.

    Example:
        >>> [(entry.images, entry.source) for entry in list_cache(Path("cache"))]  # the images of data/, decoded
        [(90, '/.../data')]
    """
    folder = Path(cache_dir or default_cache_dir())
    if not folder.is_dir():
        return []
    entries = []
    for path in folder.iterdir():
        match = _ENTRY.fullmatch(path.name) or _STAGING.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if _complete(path) else {}
            last_used = (meta_file if meta else path).stat().st_mtime
        except (OSError, ValueError):  # unreadable, or removed meanwhile: listed as incomplete
            meta, last_used = {}, 0.0
        entries.append(
            CacheEntry(
                path=path,
                key=match["key"],
                size_bytes=_tree_bytes(path),
                last_used=last_used,
                complete=bool(meta) and path.name == match["key"],
                images=meta.get("count"),
                side=meta.get("side"),
                color=(meta.get("preprocessing") or {}).get("color"),
                source=meta.get("source"),
                kind=meta.get("kind", "decoded images"),
            )
        )
    return sorted(entries, key=lambda entry: entry.last_used, reverse=True)


def clear_cache(cache_dir: Path | None = None, *, older_than_days: float | None = None) -> list[CacheEntry]:
    """Delete decoded-image caches: all of them, or those last used more than `older_than_days` days ago.

    Only what `list_cache` lists is deleted (never a symlink's target, never another file in the folder). An entry
    whose lock another process holds (a build or a read in progress) is kept; a later `clear` removes it.

    Args:
        cache_dir: the cache folder; default `default_cache_dir()`.
        older_than_days: keep caches used more recently than this; None deletes every cache.

    Returns:
        The entries deleted.

    Example:
        >>> [entry.images for entry in clear_cache(Path("cache"), older_than_days=30)]  # used today: kept
        []
        >>> [entry.images for entry in clear_cache(Path("cache"))], list_cache(Path("cache"))
        ([90], [])
    """
    folder = Path(cache_dir or default_cache_dir())
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    deleted = []
    for entry in list_cache(folder):
        if cutoff is not None and entry.last_used > cutoff:
            continue
        lock = FileLock(str(folder / f"{entry.key}.lock"), timeout=0)
        try:
            with lock:
                shutil.rmtree(entry.path)  # refuses a symlink; never follows one inside
                if not (folder / entry.key).exists():  # the lock's cache is gone
                    # Unlinked while held: a process that opens it later makes a new one. (One that opened the
                    # old file in the last microseconds and locks it after this release would not notice.)
                    # Windows cannot delete an open file: the 0-byte lock stays there.
                    with contextlib.suppress(OSError):
                        (folder / f"{entry.key}.lock").unlink(missing_ok=True)
        except Timeout:
            log.info("kept %s: another process is using it", entry.path)
            continue
        except OSError as exc:
            log.warning("could not delete %s (%s)", entry.path, exc.strerror or exc)
            continue
        deleted.append(entry)
    return deleted


def _tree_bytes(folder: Path) -> int:
    total = 0
    for current, _dirs, files in os.walk(folder):  # does not follow folder links
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(current, name)).st_size
    return total


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only shared cache: its "last used" stays the build time
        os.utime(path)


def _common_folder(paths: Sequence[Path]) -> str | None:
    try:
        return os.path.commonpath([os.path.abspath(path.parent) for path in paths]) if paths else None
    except ValueError:  # paths on different Windows drives
        return None
