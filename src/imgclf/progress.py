"""Progress reporting without a UI dependency in the library.

Long operations (scanning, training, predicting) take a `Progress` and call `task(...)` on it. The default
does nothing; the CLI passes a rich-based implementation (`imgclf.cli`), a notebook could pass a tqdm one.
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


NO_PROGRESS = Progress()
