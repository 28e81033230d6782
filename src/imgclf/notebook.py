"""imgclf in a Jupyter kernel: what a notebook shows without being configured.

Two things, and only inside a kernel (a script, the CLI and the tests are left as they are):

1. imgclf's log lines (the per-epoch lines of training among them) appear in the cell's output: `show_logs`, which
   `import imgclf` calls, attaches `KernelLogHandler` to the `imgclf` logger unless logging is configured already.
2. Long operations draw progress bars when the caller passed no `progress`: the library's default reporter
   (`imgclf.progress.NO_PROGRESS`) hands its tasks to `NotebookProgress`, tqdm's widget bar (a text bar without
   ipywidgets).

Nothing here imports IPython, tqdm or torch at import time: a process that has not imported IPython is not a kernel.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from imgclf.progress import Progress, Task

PACKAGE_LOGGER = "imgclf"


def in_kernel() -> bool:
    """True inside a Jupyter (IPython) kernel; False in a script, the CLI, terminal IPython and pytest."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    return getattr(shell, "kernel", None) is not None  # only the kernel's shell (ZMQInteractiveShell) has one


class KernelLogHandler(logging.Handler):
    """Writes imgclf's records to the cell's output as plain lines: INFO on stdout, warnings and errors on stderr
    (which Jupyter draws in red).

    It stays silent for a record that another handler shows (one the caller added after importing imgclf, e.g.
    `logging.basicConfig()`, or the CLI's when its app runs in a kernel), so no line is shown twice.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self._shown_elsewhere(logging.getLogger(record.name)):
            return
        try:
            # looked up at each record: the kernel routes sys.stdout to the cell that is running
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()  # before a progress bar's next update, so lines and bars keep their order
        except Exception:
            self.handleError(record)

    def _shown_elsewhere(self, logger: logging.Logger | None) -> bool:
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            if not logger.propagate:
                return False
            logger = logger.parent  # type: ignore[assignment]
        return False


def show_logs() -> None:
    """In a Jupyter kernel, show imgclf's INFO log lines in the cell output, once.

    Does nothing outside a kernel, when it already ran (idempotent), or when logging is configured already (the
    `imgclf` logger or the root logger has a handler: the caller's choice stands). The `imgclf` logger's level is
    set to INFO only while it is unset.

    Example:
        >>> import imgclf  # in a notebook: calls show_logs()
        >>> logging.getLogger("imgclf").handlers
        [<KernelLogHandler (INFO)>]
    """
    if not in_kernel():
        return
    package = logging.getLogger(PACKAGE_LOGGER)
    if package.handlers or logging.getLogger().handlers:
        return
    package.addHandler(KernelLogHandler())
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


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
