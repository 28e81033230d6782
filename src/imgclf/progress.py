"""Progress reporting without a UI dependency in the library.

Long operations (scanning, training, predicting) take a `Progress` and call `task(...)` on it. The default,
`NO_PROGRESS`, shows nothing, except inside a Jupyter kernel, where it draws tqdm bars (`NotebookProgress`) so that
a notebook needs no argument to see progress; the CLI passes a rich-based implementation (`imgclf.cli`).

The kernel test (`in_kernel`) and the tqdm bars live here, below `imgclf.notebook` (which uses them for its log
lines and re-exports them), so that the default reporter needs no import of the notebook module. Nothing here
imports IPython or tqdm at import time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["NO_PROGRESS", "NotebookProgress", "Progress", "Task", "in_kernel"]


class Task(Protocol):
    def advance(self, amount: int = 1, **fields: object) -> None:
        """Count `amount` units done; `fields` (e.g. loss=0.3) are shown beside the bar."""


class Progress:
    """Base progress reporter: every method is a no-op. Subclass and override `task`."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()


class _NullTask:
    def advance(self, amount: int = 1, **fields: object) -> None:
        pass


# --- in a Jupyter kernel -----------------------------------------------------------------------------------


def in_kernel() -> bool:
    """True inside a Jupyter (IPython) kernel; False in a script, the CLI, terminal IPython and pytest."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    return getattr(shell, "kernel", None) is not None  # only the kernel's shell (ZMQInteractiveShell) has one


class NotebookProgress(Progress):
    """tqdm bars in a notebook: a widget bar with ipywidgets installed, tqdm's text bar (on stderr) without.

    A bar disappears when its task ends (the log keeps a line where it matters, as in the CLI); one that stops
    early stays, red.
    """

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        bar = _bar_class()(total=total, desc=description, leave=False, dynamic_ncols=True)
        try:
            yield _BarTask(bar)
        finally:
            bar.refresh()  # its last state drawn, however fast the task went (tqdm redraws every 0.1 s)
            bar.close()


class _BarTask:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def advance(self, amount: int = 1, **fields: object) -> None:
        if fields:
            self.bar.set_postfix(fields, refresh=False)
        self.bar.update(amount)


def _bar_class() -> Any:
    """tqdm.notebook's widget bar where ipywidgets can draw it, else the text bar (what `tqdm.auto` would pick,
    without its warning)."""
    try:
        from tqdm.notebook import IProgress, tqdm

        if IProgress is not None:
            return tqdm
    except ImportError:
        pass
    from tqdm.std import tqdm

    return tqdm


class _DefaultProgress(Progress):
    """What a function reports to when its caller passes no `progress`: nothing in a script or the CLI, tqdm bars
    in a Jupyter kernel. Asked at each task, so a kernel is noticed whenever imgclf was imported."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if not in_kernel():
            yield _NullTask()
            return
        with NotebookProgress().task(description, total) as task:
            yield task


NO_PROGRESS: Progress = _DefaultProgress()
"""The default `progress` of every API function: silent, except for bars in a Jupyter kernel. `Progress()` is
silent everywhere."""
