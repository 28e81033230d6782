"""imgclf in a Jupyter kernel: what a notebook shows without being configured.

Two things, and only inside a kernel (a script, the CLI and the tests are left as they are):

1. imgclf's log lines (the per-epoch lines of training among them) appear in the cell's output: `show_logs`, which
   `import imgclf` calls, attaches `KernelLogHandler` to the `imgclf` logger unless logging is configured already.
2. Long operations draw progress bars when the caller passed no `progress`: the library's default reporter
   (`imgclf.progress.NO_PROGRESS`) hands its tasks to `NotebookProgress`, tqdm's widget bar (a text bar without
   ipywidgets). That bar and `in_kernel` live in `imgclf.progress` (the default reporter needs them, and this
   module imports `progress`, never the other way round); they are re-exported here.

Nothing here imports IPython, tqdm or torch at import time: a process that has not imported IPython is not a kernel.
"""

from __future__ import annotations

import logging
import sys

from imgclf.progress import NotebookProgress, in_kernel

__all__ = ["PACKAGE_LOGGER", "KernelLogHandler", "NotebookProgress", "in_kernel", "show_logs"]

PACKAGE_LOGGER = "imgclf"


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
        >>> import imgclf  # calls show_logs()
        >>> in_kernel()  # here, a test: nothing was attached
        False
        >>> logging.getLogger("imgclf").handlers  # in a Jupyter kernel  # doctest: +SKIP
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
