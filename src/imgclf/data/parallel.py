"""Run a per-image function over many images on every core: the scan's decode check, the cache build, prediction.

Decoding a small image is mostly Python work inside Pillow, so threads queue on the GIL: on 2 cores a thread
pool checked 28x28 PNGs only ~1.2x as fast as one thread. Forked processes each have their own interpreter;
they inherit the function and its data without pickling, and write into shared memory maps (the cache array)
directly. Fork exists on Linux only (macOS and Windows spawn, which would re-run an unguarded user script), and
starting processes is not worth it for small jobs: there, and for jobs below `PROCESS_MIN_ITEMS`, a thread pool
does the work. `usable_cpus` counts the cores a process may really use (affinity and container quota).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PROCESS_MIN_ITEMS = 2000
CHUNK = 64  # items per message between processes

_task: Callable[[int], object] | None = None  # the function, as the forked workers inherit it


def map_indices(function: Callable[[int], T], count: int, *, workers: int | None = None) -> Iterator[T]:
    """`function(i)` for i in range(count), in order, on `workers` processes (or threads).

    Args:
        function: called with an index; its result must be picklable (processes send it back).
        count: number of indices.
        workers: processes or threads; default one per usable core.

    Example:
        >>> list(map_indices(lambda i: i * i, 4))
        [0, 1, 4, 9]
    """
    workers = workers or usable_cpus()
    if workers > 1 and count >= PROCESS_MIN_ITEMS and sys.platform == "linux":
        yield from _forked(function, count, workers)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(function, range(count))


def _forked(function: Callable[[int], T], count: int, workers: int) -> Iterator[T]:
    global _task
    _task = function
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns on any fork of a process with threads; the workers only decode and never touch
            # the parent's locks (torch's intra-op threads are reset to one, as DataLoader workers do).
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_single_threaded)
        with pool:
            yield from pool.imap(_call, range(count), chunksize=CHUNK)
    finally:
        _task = None


def _call(index: int):
    assert _task is not None
    return _task(index)


def _single_threaded() -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup CPU quota (a container started
    with `--cpus 2` on a 64-core host sees 64 cores, and 64 compute threads there run far slower than 2).

    Example:
        >>> usable_cpus() >= 1
        True
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup allows (v2 `cpu.max`, or v1's cfs files); None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        return int(quota) / int(period) if int(quota) > 0 else None
    except (ValueError, ZeroDivisionError):
        return None  # "max": no quota
