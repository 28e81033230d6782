"""Progress reporting without a UI dependency in the library.

Long operations (scanning, training, predicting) take a `Progress` and call `task(...)` on it. The default,
`NO_PROGRESS`, shows nothing, except inside a Jupyter kernel, where it draws tqdm bars (`imgclf.notebook`) so that
a notebook needs no argument to see progress; the CLI passes a rich-based implementation (`imgclf.cli`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


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


class _DefaultProgress(Progress):
    """What a function reports to when its caller passes no `progress`: nothing in a script or the CLI, tqdm bars
    in a Jupyter kernel. Asked at each task, so a kernel is noticed whenever imgclf was imported."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        from imgclf.notebook import NotebookProgress, in_kernel  # lazy: notebook imports this module

        if not in_kernel():
            yield _NullTask()
            return
        with NotebookProgress().task(description, total) as task:
            yield task


NO_PROGRESS: Progress = _DefaultProgress()
"""The default `progress` of every API function: silent, except for bars in a Jupyter kernel. `Progress()` is
silent everywhere."""
