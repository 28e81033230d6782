"""Where the CLI writes: the consoles (results on stdout, logs and progress on stderr), progress as rich bars in a
terminal and plain lines elsewhere, log records, the torchrun rank, and the error-to-exit-code wrapper."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from imgclf.errors import ImgclfError
from imgclf.flags import keys_to_flags
from imgclf.progress import Progress, Task

__all__ = ["RichProgress", "console", "handles_errors", "out_console", "rank", "setup_logging"]

UNWRAPPED_WIDTH = 100_000  # tables take only the width they need, so this is a "never wrap", not a padding


def _console(*, stderr: bool) -> Console:
    """Rich output that fits a terminal; anywhere else (CI, nohup, `| tee`, a file) lines are never wrapped, so a
    path or model name in a log or a table copy-pastes whole. (Off a terminal rich would wrap at 80 columns.)"""
    terminal = Console(stderr=stderr)
    return terminal if terminal.is_terminal else Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED_WIDTH)


console = _console(stderr=True)  # logs, progress, errors
out_console = _console(stderr=False)  # results

PROGRESS_SECONDS = 30.0  # off a terminal: the longest silence between progress lines ($IMGCLF_PROGRESS_SECONDS)
PROGRESS_MIN_GAP = 2.0  # ... and the shortest gap between two lines that mark 10 % steps

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(command: F) -> F:
    """Turn imgclf errors into a one-line message and an exit code instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return command(*args, **kwargs)
        except ImgclfError as exc:
            console.print(f"[bold red]error:[/] {escape(keys_to_flags(str(exc)))}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class RichProgress(Progress):
    """In a terminal, progress bars on stderr that disappear when their task ends (the log keeps a summary line).

    Anywhere else a bar would show nothing until the end, so each task writes plain lines instead (no cursor
    control): one at every 10 % of its work, no closer than PROGRESS_MIN_GAP seconds apart, one at least every
    $IMGCLF_PROGRESS_SECONDS (default 30; 0: at every update), and one when it ends.
    """

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if not console.is_interactive:
            every = _progress_seconds()
            plain = _PlainTask(description, total, every_s=every, min_gap_s=min(PROGRESS_MIN_GAP, every))
            try:
                yield plain
            except BaseException:
                plain.finish(stopped=True)
                raise
            plain.finish()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Bars(*columns, console=console, transient=True) as bar:
            task_id = bar.add_task(description, total=total, info="")
            yield _RichTask(bar, task_id)


class _RichTask:
    def __init__(self, bar: Any, task_id: Any) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, amount: int = 1, **fields: object) -> None:
        info = "  ".join(f"{key} {value}" for key, value in fields.items())
        self.bar.update(self.task_id, advance=amount, **({"info": info} if info else {}))


class _PlainTask:
    """One task's progress as lines: `epoch 2/10: 450/900 (50%), 0:01:12, 6.2/s, loss 0.4213`."""

    def __init__(self, description: str, total: int | None, *, every_s: float, min_gap_s: float) -> None:
        import time

        self.clock = time.monotonic
        self.description, self.total = description, total
        self.every_s, self.min_gap_s = every_s, min_gap_s
        self.started = self.last_line = self.clock()
        self.done, self.marks_shown, self.info = 0, 0, ""

    def advance(self, amount: int = 1, **fields: object) -> None:
        self.done += amount
        if fields:
            self.info = ", ".join(f"{key} {value}" for key, value in fields.items())
        now = self.clock()
        mark = self.done * 10 // self.total if self.total else 0  # tenths done; 10 (the end) is finish's line
        if now - self.last_line >= self.every_s or (
            self.marks_shown < mark < 10 and now - self.last_line >= self.min_gap_s
        ):
            self._line(now, "")
            self.marks_shown = mark

    def finish(self, *, stopped: bool = False) -> None:
        if self.done or self.total:
            self._line(self.clock(), "stopped at " if stopped or (self.total and self.done < self.total) else "done, ")

    def _line(self, now: float, prefix: str) -> None:
        elapsed = now - self.started
        count = f"{self.done}/{self.total} ({self.done / self.total:.0%})" if self.total else f"{self.done}"
        rate = f", {self.done / elapsed:.1f}/s" if elapsed > 0 and self.done else ""
        info = f", {self.info}" if self.info else ""
        console.out(f"{self.description}: {prefix}{count}, {_clock(elapsed)}{rate}{info}", highlight=False)
        self.last_line = now


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _progress_seconds() -> float:
    import os

    from imgclf.errors import ConfigError

    raw = os.environ.get("IMGCLF_PROGRESS_SECONDS", "").strip()
    try:
        seconds = float(raw) if raw else PROGRESS_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ConfigError(f"IMGCLF_PROGRESS_SECONDS must be a number of seconds >= 0; received '{raw}'")
    return seconds


class _PlainLogHandler(logging.Handler):
    """Log records as plain lines, `WARNING  message`, never wrapped: for stderr that is not a terminal, where
    RichHandler would wrap at 80 columns and pad every line to that width."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.out(f"{record.levelname:<8} {self.format(record)}", highlight=False)
        except Exception:  # logging's contract: a broken stream must not break the program
            self.handleError(record)


def setup_logging() -> None:
    """Log imgclf's INFO messages to stderr (once per process): through rich in a terminal, as plain lines
    elsewhere. Under torchrun, rank 0 logs; the other processes only warn, each line marked with its rank."""
    package_logger = logging.getLogger("imgclf")
    if any(isinstance(handler, (RichHandler, _PlainLogHandler)) for handler in package_logger.handlers):
        return
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    else:
        handler = _PlainLogHandler()
    process = rank()
    handler.setFormatter(logging.Formatter(f"[rank {process}] %(message)s" if process else "%(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if process == 0 else logging.WARNING)


def rank() -> int:
    """This process's global rank under torchrun (0 for a single process): only rank 0 prints results."""
    import os

    return int(os.environ.get("RANK", "0"))
