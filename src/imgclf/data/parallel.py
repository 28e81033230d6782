"""Run a per-image function over many images on every core: the scan's decode check, the cache build, prediction.

Decoding a small image is mostly Python work inside Pillow, so threads queue on the GIL: on 2 cores a thread
pool checked 28x28 PNGs only ~1.2x as fast as one thread. Forked processes each have their own interpreter;
they inherit the function and its data without pickling, and write into shared memory maps (the cache array)
directly. Fork exists on Linux only (macOS and Windows spawn, which would re-run an unguarded user script), and
starting processes is not worth it for small jobs: there, and for jobs below `PROCESS_MIN_ITEMS`, a thread pool
does the work, one per usable core (`imgclf.cpus.usable_cpus`).
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from imgclf.cpus import usable_cpus

__all__ = ["map_indices"]

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
