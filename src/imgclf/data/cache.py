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

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from imgclf.data.images import load_image
from imgclf.data.parallel import map_indices
from imgclf.data.preprocessing import Preprocessing, chw_array, resize_shorter
from imgclf.errors import DataError, ImageError
from imgclf.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
        >>> decoded_images(paths, hashes, pre, mode="disk", max_pixels=50_000_000).array.shape
        (60000, 1, 28, 28)
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
        meta = json.loads((target / "meta.json").read_text(encoding="utf-8"))
    array = np.load(target / "images.npy", mmap_mode="r")
    if array.shape != (len(paths), pre.in_chans, side, side):
        raise DataError(f"decoded-image cache {target} has shape {array.shape}; delete the folder to rebuild it")
    failed = [(int(index), reason) for index, reason in meta.get("failed", [])]
    return DecodedImages(array, side, built=built, location=target, failed=failed)


def fingerprint(paths: Sequence[Path], sha256: Sequence[str], pre: Preprocessing) -> str:
    """Changes when any file's path, size, mtime or content changes, or when the stored preprocessing does."""
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT_VERSION, cache_side(pre), pre.color, pre.interpolation]).encode())
    for path, content in zip(paths, sha256, strict=True):
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # gone since the scan: the build records it as a failure; its return changes the key
            size, mtime = -1, -1
        digest.update(f"{path}\0{size}\0{mtime}\0{content}\n".encode())
    return digest.hexdigest()[:32]


def _complete(target: Path) -> bool:
    return (target / "meta.json").is_file() and (target / "images.npy").is_file()


def _build(target: Path, paths, pre, max_pixels, progress, threads) -> None:
    side = cache_side(pre)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        array = np.lib.format.open_memmap(
            staging / "images.npy", mode="w+", dtype=np.uint8, shape=(len(paths), pre.in_chans, side, side)
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
    return torch.from_numpy(np.asarray(array))
